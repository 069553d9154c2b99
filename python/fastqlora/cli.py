"""The ``fastqlora`` command: ``train``, ``generate``, ``export`` and ``demo``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence

from .train.config import TrainConfig, load_config_file


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _checkpointing(text: str) -> bool | str:
    low = text.lower()
    if low in ("offload", "unsloth"):
        return low
    return _bool(text)


def _bool_or_auto(text: str) -> bool | str:
    return "auto" if text.lower() == "auto" else _bool(text)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        if f.name == "use_gradient_checkpointing":
            kind = _checkpointing
        elif f.name == "cuda_graph":
            kind = _bool_or_auto
        elif "bool" in hint:
            kind = _bool
        elif "int" in hint and "float" not in hint:
            kind = int
        elif "float" in hint:
            kind = float
        else:
            kind = str
        # --lora-r too: torchrun's own parser rejects "--r" as an ambiguous abbreviation of its flags
        flags = (flag, "--lora-r") if f.name == "r" else (flag,)
        p.add_argument(*flags, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                       help=f"(default: {f.default if f.default is not dataclasses.MISSING else 'required'})")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    settings = load_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    for required in ("model", "dataset"):
        if required not in settings:
            raise SystemExit(f"fastqlora train: --{required} is required (or set it in --config)")
    return TrainConfig(**settings)


def cmd_train(args: argparse.Namespace) -> int:
    from .api import FastLanguageModel
    from .train import Trainer, distributed

    cfg = _train_config(args)
    # under torchrun: join the process group, one GPU a process
    group, device = distributed.setup(cfg.device)
    model, tokenizer = FastLanguageModel.from_pretrained(
        cfg.model, max_seq_length=cfg.max_seq_length, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
        device=device,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, use_gradient_checkpointing=cfg.use_gradient_checkpointing,
        random_state=cfg.seed, use_rslora=cfg.use_rslora,
    )
    try:
        history = Trainer(model, tokenizer, cfg).train()
    except KeyboardInterrupt:
        return 130
    # Every process waits here until all have finished (files written), and only after a
    # run that finished: on an error the others may wait in a collective this one will
    # never join (torchrun stops them once this process exits non-zero). The group is left
    # by ending the process (`run`).
    if group is not None:
        distributed.barrier()
    if group is None or group.main:
        print(f"trained {len(history)} steps; final loss {history[-1]['loss']:.4f}; "
              f"adapter in {cfg.output_dir}/adapter")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .api import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        args.model, load_in_4bit=args.load_in_4bit, dtype=args.dtype, device=args.device
    )
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer files: generate needs one")
    FastLanguageModel.for_inference(model)
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    from transformers import TextStreamer

    # the text is printed as it is generated (a word at a time, as transformers' streamer does)
    model.generate(ids.to(model.device), max_new_tokens=args.max_new_tokens,
                   do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-5),
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_token_id=model.stop_ids([tokenizer.eos_token_id]),
                   streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .api import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.adapter, load_in_4bit=False, dtype=args.dtype,
                                                         device=args.device)
    model.save_pretrained_merged(args.out, tokenizer, save_method="merged_4bit" if args.nf4 else "merged_16bit")
    print(f"merged {'NF4 (bnb-4bit)' if args.nf4 else '16-bit'} checkpoint written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, output_dir=args.output_dir, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastqlora", description="Fast QLoRA/LoRA finetuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="finetune a model on a JSONL dataset")
    p.add_argument("--config", help="a .yaml/.toml/.json file of settings (flags override it)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a model or adapter folder")
    p.add_argument("--model", required=True, help="model folder, hub id, or adapter folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--load-in-4bit", type=_bool, default=True)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="merge an adapter into its base and write a 16-bit (or NF4) checkpoint")
    p.add_argument("--adapter", required=True, help="adapter folder written by training")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--nf4", action="store_true", help="quantize the merged projections to NF4 (bnb-4bit format)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="finetune the bundled tiny model on the bundled dataset (CPU is fine)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: about a minute of work)")
    p.add_argument("--output-dir", default="fastqlora-demo")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"fastqlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """The console script and ``python -m fastqlora.cli``: :func:`main`, then exit with its code.

    A process that torchrun started ends with ``os._exit`` once its output is flushed: by
    then its files are written and closed and every process has passed the final barrier,
    so no collective is pending, and the OS closes the connections. Tearing down
    torch.distributed's C++ state instead (``destroy_process_group``, or the interpreter's
    exit) has aborted a finished gloo process in CI ("terminate called without an active
    exception", SIGABRT; not reproduced in isolation)."""
    from .train.distributed import launched

    code = main()
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
