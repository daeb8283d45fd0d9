"""python -m subq.train: train one of subq's models on a generated English-like corpus (no download), with a
progress bar, validation loss and perplexity, checkpoints, loss curves and exact resume.

    python -m subq.train                                   # mamba2, tiny preset, 1000 steps, on the GPU if any
    python -m subq.train --model mamba2 --override d_model=128 --override n_layer=4 --steps 3000 --generate 200
    python -m subq.train --resume --steps 2000             # continue the run in --out, then train longer
    torchrun --nproc-per-node 4 -m subq.train --batch-size 64      # 4 processes (DDP), 16 rows each
    torchrun --nproc-per-node 4 -m subq.train --cp 2 --seq-len 4096  # 2 data-parallel x 2 context-parallel

Across processes (:mod:`subq.train.parallel`) the run is the one-process run of the same --batch-size (the global
batch); rank 0 prints and writes, and its checkpoints resume at any number of processes.

Writes to --out: checkpoints/step_NNNNNNN/ (the model's save_pretrained files and trainer.pt), history.json and
loss.png. A bad request is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from subq.profile.progress import Progress
from subq.train import checkpoint, memory, parallel, report
from subq.train.config import TrainConfig, flag, merge
from subq.train.corpus import Corpus
from subq.train.errors import TrainError
from subq.train.loop import Run, TrainState, make_optimizer, not_decayed, train
from subq.train.objectives import OBJECTIVES
from subq.train.registry import MODELS, build_model, check_seq_len, lookup
from subq.train.sample import sample

HELP = {
    "steps": "optimizer steps in all", "batch_size": "blocks per step", "seq_len": "tokens per block",
    "lr": "peak learning rate", "warmup": "linear warm-up steps before the cosine decay",
    "weight_decay": "AdamW weight decay (matrices only)", "grad_clip": "gradient norm clip (0: off)",
    "eval_every": "steps between evaluations", "eval_batches": "val batches per evaluation",
    "save_every": "steps between checkpoints (one is also saved at the end)",
    "seed": "seed of the corpus, the initialisation and the batches", "corpus_chars": "size of the generated text",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise TrainError(message)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = _Parser(prog="python -m subq.train", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"one of {', '.join(sorted(MODELS))} (default {defaults.model})")
    parser.add_argument("--preset", help=f"the model's preset (default {defaults.preset})")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE",
                        help="a field of the model's config, e.g. d_model=128 or attn_layer_idx=(1,); repeatable")
    for field in dataclasses.fields(TrainConfig):
        if field.name in HELP:
            parser.add_argument(flag(field.name), type=type(getattr(defaults, field.name)),
                                help=f"{HELP[field.name]} (default {getattr(defaults, field.name)})")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, help="output folder (default out/train_<model>_<preset>)")
    parser.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                        help="continue from a checkpoint folder, or from the latest one in an output folder "
                             "(without a value: in --out); only --steps and the eval/save settings may change")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="after training, print N sampled bytes following --prompt (causal models)")
    parser.add_argument("--prompt", default="The", help="the text --generate continues (default 'The')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--cp", type=int, default=1, metavar="N",
                        help="context parallelism (mamba2, flash): N consecutive processes share each sequence, "
                             "in contiguous shards (default 1)")
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction,
                        help="shard parameters, gradients and optimizer state over the processes with FSDP2 "
                             "instead of replicating them with DDP (default: FSDP2 from "
                             f"{parallel.FSDP_DEFAULT_PARAMS / 1e9:g}B parameters)")
    return parser


def default_out(model: str, preset: str) -> Path:
    return Path("out") / f"train_{model}_{preset}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def _refuse_overwriting(out: Path, resumed_from: Path, step: int) -> None:
    """A resumed run writes checkpoints after ``step`` into ``out``: none may be there already, or it would
    replace checkpoints it did not make (and history.json would no longer describe them)."""
    later = [p for p in checkpoint.listed(out) if checkpoint.step_of(p) > step]
    if later:
        names = ", ".join(p.name for p in reversed(later))
        raise TrainError(f"--resume {resumed_from} is at step {step}, but {out / checkpoint.FOLDER} already holds "
                         f"later checkpoints ({names}) that this run would overwrite: resume from the latest, "
                         f"{later[0]}, or branch into a new folder with --out")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    defaults = TrainConfig()
    saved = resumed_from = resumed_model = None
    if args.resume is not None:
        where = args.resume or args.out or default_out(args.model or defaults.model, args.preset or defaults.preset)
        resumed_from = checkpoint.find(Path(where))
        saved, resumed_model = checkpoint.load(resumed_from)
    config = merge(saved and saved["config"], vars(args))
    out = args.out or (resumed_from.parent.parent if resumed_from else default_out(config.model, config.preset))
    if resumed_from is None and (out / checkpoint.FOLDER).exists():
        raise TrainError(f"--out {out} already holds checkpoints: add --resume to continue that run, "
                         "or choose another --out")
    if resumed_from is not None:
        _refuse_overwriting(out, resumed_from, saved["step"])
    entry = lookup(config.model)
    if args.generate < 0:
        raise TrainError(f"--generate must not be negative, got {args.generate}")
    if args.generate and (entry.objective != "causal" or not hasattr(entry.model_class, "generate")):
        raise TrainError(f"--generate: {config.model} is a {entry.objective} model without generation")
    if args.generate and not args.prompt:
        raise TrainError("--prompt must not be empty with --generate")
    world = parallel.process_count()
    device = parallel.local_device(resolve_device(args.device), world)

    # The model's build, its length limit, the layout and the memory first, on the meta device (no memory, no
    # time): each can refuse the run before the corpus is generated, a process group joined or a model allocated.
    planned = resumed_model
    if planned is None:
        with torch.device("meta"):
            planned = build_model(config.model, config.preset, config.override)
    check_seq_len(planned, config)
    parallel.check(world, args.cp, config.model, config,
                   planned.config.chunk_size if config.model == "flash" else None)
    params = sum(p.numel() for p in planned.parameters())
    fsdp = world > 1 and (args.fsdp if args.fsdp is not None else params >= parallel.FSDP_DEFAULT_PARAMS)
    memory.check_fits(planned, config, device, world // args.cp, args.cp, world if fsdp else 1)
    layout = parallel.start(world, args.cp, fsdp, device)
    try:
        status = _train(args, config, entry, layout, device, out, saved, resumed_from, resumed_model, params)
    except BaseException:
        parallel.stop(layout, finished=False)
        raise
    parallel.stop(layout)
    return status


def _train(args, config: TrainConfig, entry, layout: parallel.Layout, device: torch.device, out: Path,
           saved: dict | None, resumed_from: Path | None, resumed_model, params: int) -> int:
    log = print if layout.is_main else _quiet
    torch.manual_seed(config.seed)  # the same on every rank: the same initialisation, the same dropout draws
    cp = {"cp_group": layout.cp_group} if layout.cp > 1 else {}
    if resumed_model is None:
        model = build_model(config.model, config.preset, config.override, **cp)
    elif cp:
        model = entry.model_class(resumed_model.config, **cp)
        model.load_state_dict(resumed_model.state_dict())
    else:
        model = resumed_model
    objective = OBJECTIVES[entry.objective]
    corpus = Corpus.generate(config.corpus_chars, config.seed)
    train_blocks, val_blocks = corpus.blocks(config.seq_len + objective.extra_tokens)
    no_decay = not_decayed(model)
    model.to(device)
    module = parallel.wrap(model, layout, device, entry.routed)
    state = TrainState(model, *make_optimizer(model, config, no_decay),
                       data_rng=torch.Generator().manual_seed(config.seed))
    if saved is not None:
        checkpoint.restore(state, saved, layout)
        if state.step >= config.steps:
            raise TrainError(f"{resumed_from} is at step {state.step}, --steps is {config.steps}: nothing to "
                             "train (raise --steps)")
    if layout.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainError(f"--out {out}: cannot create the folder ({err.strerror})") from None

    where = str(device)
    if layout.distributed:
        where += (f" x {layout.world} processes ({'FSDP2' if layout.fsdp else 'DDP'}, data-parallel {layout.dp}"
                  + (f" x context-parallel {layout.cp}" if layout.cp > 1 else "") + ")")
    log(f"{config.model} ({config.preset}): {params / 1e6:.3g}M parameters, {entry.objective} LM on {where}; "
        f"corpus {corpus.train.numel():,} train / {corpus.val.numel():,} val bytes"
        + (f"; resuming {resumed_from} at step {state.step}" if resumed_from else ""))
    title = f"{config.model} ({config.preset}), {entry.objective} LM"
    written = {}

    def save(state: TrainState) -> None:
        # Gathered on every rank (collectives under FSDP2), written once, by rank 0, in the one-process format.
        whole = parallel.plain_copy(state.model, entry.model_class, layout)
        optimizer_state = parallel.full_optimizer_state(state.model, state.optimizer, layout)
        if not layout.is_main:
            return
        written["checkpoint"] = checkpoint.save(out, state, config, whole, optimizer_state)
        written["history"] = report.write_history(out, state.history, config.to_dict())
        try:
            written["plot"] = report.plot_losses(out, state.history, title)
        except ImportError:
            print("subq.train: no loss.png: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)

    progress = Progress(config.steps, enabled=not args.no_progress and layout.is_main)
    progress.done = state.step
    start = time.monotonic()
    run = Run(config, entry, objective, train_blocks, val_blocks, device, layout,
              module if module is not model else None)
    train(run, state, progress, save, log)
    progress.close()

    if args.generate:
        generator = parallel.plain_copy(state.model, entry.model_class, layout, without_cp=True)
        if layout.is_main:
            print(f"sample: {sample(generator.to(device), args.prompt, args.generate, config.seed, device)!r}")
    val = state.history["val"][-1]
    recent = [r["loss"] for r in state.history["train"][-config.eval_every:]]
    log(f"done: {config.model} ({config.preset}) step {state.step}, train loss {sum(recent) / len(recent):.4f}, "
        f"val loss {val['loss']:.4f} (ppl {val['ppl']:.4g}) in {time.monotonic() - start:.0f} s; "
        f"wrote {', '.join(str(path) for path in written.values())}")
    return 0


def _quiet(*args, **kwargs) -> None:
    """The log of the ranks other than 0: only rank 0 prints."""


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0, 2 and one line on stderr for a bad request, 130 when interrupted."""
    try:
        return _main(argv)
    except TrainError as err:
        if parallel.process_rank() == 0:  # every rank meets the same bad request: one says so
            print(f"subq.train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if parallel.process_rank() == 0:
            print("subq.train: interrupted (resume from the last checkpoint with --resume)", file=sys.stderr)
        return 130
