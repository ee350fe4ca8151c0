"""``--model vtprune_vllm`` for lmms-eval: lmms-eval's own ``vllm`` model, serving vtprune's pruning class.

Prompting, batching, decoding and every engine argument are lmms-eval's ``vllm`` model's; this class only turns
``schedule=`` into the engine's ``hf_overrides`` (:func:`vtprune.vllm.engine_args`), so an unsupported schedule or
model is refused before the engine starts. Without this class the same run is
``--model vllm --model_args 'model=M,hf_overrides={"architectures": ["VTPruneLlavaForConditionalGeneration"],
"vtprune_schedule": "divprune:64"}'`` (lmms-eval parses JSON values with commas in them).
"""

from __future__ import annotations

import json
from typing import Any

from lmms_eval.models.simple.vllm import VLLM

from ..errors import OptionError
from ..vllm import SCHEDULE_KEY, engine_args


class VTPruneVLLM(VLLM):
    """lmms-eval's ``vllm`` model with the engine's default schedule ``schedule`` (None: prune nothing).

    ``architecture`` names the checkpoint's own architecture when ``model`` is not a local folder (a hub id);
    ``hf_overrides`` may carry other overrides, but not the two this class writes (also when
    ``schedule`` is None: a schedule hidden there would bypass the check).
    """

    def __init__(
        self,
        model: str,
        schedule: str | None = None,
        architecture: str | None = None,
        hf_overrides: dict[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        pruning = engine_args(model, schedule, architecture)["hf_overrides"]
        others = json.loads(hf_overrides) if isinstance(hf_overrides, str) else dict(hf_overrides or {})
        clashing = sorted(set(others) & {"architectures", SCHEDULE_KEY})
        if clashing:
            raise OptionError(
                f"hf_overrides sets {clashing}, which --model vtprune_vllm writes itself: pass the schedule as "
                "schedule=... and the checkpoint's architecture as architecture=..., or use --model vllm"
            )
        super().__init__(model=model, hf_overrides={**others, **pruning}, **kwargs)
