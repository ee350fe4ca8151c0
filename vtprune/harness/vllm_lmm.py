"""``--model vtprune_vllm`` for lmms-eval: lmms-eval's own ``vllm`` model, serving vtprune's pruning class.

Prompting, batching, decoding and every engine argument are lmms-eval's ``vllm`` model's; this class turns
``schedule=`` into the engine's ``hf_overrides`` (:func:`vtprune.vllm.engine_args`), so an unsupported schedule or
model is refused before the engine starts. A sweep changes the schedule between runs on the same engine
(:meth:`VTPruneVLLM.set_schedule`): each request then carries it in ``mm_processor_kwargs``, which vLLM's caches key
on. Without this class the same run is ``--model vllm --model_args 'model=M,hf_overrides={"architectures":
["VTPruneLlavaForConditionalGeneration"], "vtprune_schedule": "divprune:64"}'`` (lmms-eval parses JSON values
with commas in them).
"""

from __future__ import annotations

import json
from typing import Any

from lmms_eval.models.simple.vllm import VLLM

from ..errors import OptionError
from ..vllm import SCHEDULE_KEY, engine_args
from ..vllm.plan import make_plan, placeholder_ids


class VTPruneVLLM(VLLM):
    """lmms-eval's ``vllm`` model with the engine's default schedule ``schedule`` (None: prune nothing).

    ``architecture`` names the checkpoint's own architecture when ``model`` is not a local folder (a hub id);
    ``hf_overrides`` may carry other overrides, but not the two this class writes (also when
    ``schedule`` is None: a schedule hidden there would bypass the check). :attr:`image_tokens` holds the number
    of image placeholder tokens of every prompt served since the last :meth:`set_schedule`: what the model saw.
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
        self.request_schedule: str | None = None
        self.image_tokens: list[int] = []

    def set_schedule(self, schedule: str | None) -> None:
        """Prune every following request with ``schedule`` (None: the engine's default), on the same engine.

        Checked here, before any request: an unsupported schedule raises
        :class:`~vtprune.vllm.UnsupportedScheduleError`. Also starts a new count of :attr:`image_tokens`.
        """
        if schedule is not None:
            make_plan(schedule)
        self.request_schedule = schedule
        self.image_tokens = []

    def generate_until(self, requests: list[Any]) -> list[str]:
        # lmms-eval's generate_until calls self.client.chat; for its duration this instance's chat passes the
        # schedule and counts the image tokens of each prompt (an instance attribute, removed afterwards).
        client = self.client
        chat = client.chat
        config = client.llm_engine.model_config.hf_config
        image_token = placeholder_ids(config)[0]

        def chat_with_schedule(*args: Any, **kwargs: Any) -> Any:
            if self.request_schedule is not None:
                # Merged, not replaced: a caller's own processor kwargs (max_pixels, ...) must still reach vLLM.
                kwargs["mm_processor_kwargs"] = {
                    **(kwargs.get("mm_processor_kwargs") or {}),
                    SCHEDULE_KEY: self.request_schedule,
                }
            outputs = chat(*args, **kwargs)
            self.image_tokens += [output.prompt_token_ids.count(image_token) for output in outputs]
            return outputs

        client.chat = chat_with_schedule
        try:
            return super().generate_until(requests)
        finally:
            del client.chat

    def close(self) -> None:
        """Shut the engine down now (a sweep's end), not whenever the garbage collector gets to it."""
        self.client.llm_engine.engine_core.shutdown()
