"""`llamalab train`: run a training config (`--config FILE.yaml`, `key.sub=value` overrides), resume it, or
plot a run (`llamalab train plot RUN_DIR`). Registered by `llamalab.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": False})(train)


def train(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Overrides KEY=VALUE (e.g. optim.lr=1e-4 lora.r=16), or: plot RUN_DIR [OUT.png]."
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The run's YAML config.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run's `out`.")
    ] = False,
) -> None:
    """Train a model: pretraining (`objective: clm`, `init: {...}`), continued pretraining, SFT or DPO, with
    LoRA or QLoRA adapters, on one process or under `torchrun --nproc-per-node N -m llamalab train ...`
    (DDP; `distributed: fsdp` for FSDP2). Example configs are in recipes/. `llamalab train plot RUN_DIR`
    draws a run's loss curves."""
    args = list(args or [])
    if args and args[0] == "plot":
        from llamalab.errors import LlamalabError
        from llamalab.train.plot import plot_run

        if len(args) not in (2, 3) or config or resume:
            raise LlamalabError("usage: llamalab train plot RUN_DIR [OUT.png]")
        print(f"wrote {plot_run(Path(args[1]), Path(args[2]) if len(args) == 3 else None)}")
        return
    from llamalab.train.config import load_config
    from llamalab.train.loop import train as run

    result = run(load_config(config, args), resume=resume)
    if result.export is not None:
        print(f"trained {result.steps} steps (loss {result.final_loss:.4f}); model: {result.export}")
