"""`peftkit train`: run in this process, or hand over to torchrun; the resume command; the summary printed after."""

from __future__ import annotations

import argparse
import logging
import sys

from peftkit.errors import PeftkitError

logger = logging.getLogger("peftkit")


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from peftkit.config import load_config
    from peftkit.train.run import train

    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        return _torchrun(args)
    cfg = load_config(args.config, args.overrides)  # every process checks it: errors show before any launch
    summary = train(cfg, resume_command=resume_command(args)).summary
    if os.environ.get("RANK", "0") == "0":
        _print_summary(summary)
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The shell command that resumes this run: the same config and overrides (quoted), resume set."""
    import shlex

    keep = [o for o in args.overrides if o.partition("=")[0] not in ("train.resume_from_checkpoint",
                                                                       "train.overwrite_output_dir")]
    words = ["peftkit", "train", *_launch_flags(args), args.config, *keep, "train.resume_from_checkpoint=true"]
    return " ".join(shlex.quote(w) for w in words)


_LAUNCH_ENV = "PEFTKIT_LAUNCH_FLAGS"  # the launch flags, passed to the processes torchrun starts


def _launch_flags(args: argparse.Namespace) -> list[str]:
    """peftkit train's own launch flags, as given (for the resume command); in a process torchrun started
    for them, as its launcher passed them on."""
    import os

    if "LOCAL_RANK" in os.environ and os.environ.get(_LAUNCH_ENV):
        return os.environ[_LAUNCH_ENV].split()
    return ([f"--nproc={args.nproc}"] if args.nproc > 1 else []) + (_node_flags(args) if args.nnodes > 1 else [])


def _node_flags(args: argparse.Namespace) -> list[str]:
    """--nnodes / --node-rank / --master-addr / --master-port: spelled alike by peftkit train and torchrun."""
    return [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}"]


def _torchrun(args: argparse.Namespace) -> int:
    """`--nproc N` (and `--nnodes`): hand over to torchrun (never a launcher of peftkit's own); it forwards
    signals. One node: --standalone. Several: a static rendezvous at --master-addr:--master-port, the
    command run on every node with its own --node-rank (what `torchrun --nnodes` documents)."""
    import os

    from peftkit.config import load_config

    if args.nnodes > 1 and (not args.master_addr or not 0 <= args.node_rank < args.nnodes):
        raise PeftkitError(f"--nnodes {args.nnodes} needs --master-addr (the address of node 0, reachable from every "
                           f"node) and --node-rank from 0 to {args.nnodes - 1} (this node's; got {args.node_rank})")
    load_config(args.config, args.overrides)  # fail here, once, rather than in N processes
    nodes = ["--standalone"] if args.nnodes == 1 else _node_flags(args)
    command = [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc_per_node={args.nproc}",
               "-m", "peftkit", "train", args.config, *args.overrides]
    os.environ[_LAUNCH_ENV] = " ".join(_launch_flags(args))  # for the workers' resume hint
    logger.info("running: %s", " ".join(command[1:]))
    os.execv(sys.executable, command)
    return 0  # not reached


# The figures each stage is judged by (sft, pt, rm, dpo, cls).
_SHOWN_METRICS = ("precision", "recall", "f1", "exact_match", "invalid_json", "perplexity", "accuracy", "margin",
                  "rewards/accuracies", "rewards/margins", "majority_accuracy")


def _print_summary(summary: dict) -> None:
    lines = [f"training loss: {summary['train_loss']:.4f} ({summary['train_seconds']} s of training)"]
    for when in ("before", "after"):
        m = summary.get(f"metrics_{when}")
        if m:
            shown = {k: v for k, v in m.items() if k in _SHOWN_METRICS}
            lines.append(f"{when:>6} training: " + ", ".join(f"{k} {v}" for k, v in shown.items())
                         + (f" on {m['records']} records" if "records" in m else "")
                         + (f" ({m['predict_seconds']} s)" if "predict_seconds" in m else ""))
            if when == "after" and m.get("per_type"):
                lines.append("        F1 per type: " + ", ".join(f"{k} {v['f1']}" for k, v in m["per_type"].items()))
    lines.append(f"wall time: {summary['wall_seconds']} s")
    lines.append(f"outputs: {summary['output_dir']}")
    print("\n".join(lines))
