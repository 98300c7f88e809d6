"""LoRA fine-tuning of Gemma 3 270M on a CPU: a JSONL of examples in, adapters out.

    edgegemma train --data examples.jsonl --out my-skill

Each line of the data is ``{"prompt": "...", "completion": "..."}``; the model reads BOS,
the prompt, the completion and EOS, and the loss covers the completion and EOS only, so the
adapter learns to answer and then stop. The completion is appended to the prompt as it is:
start it with the space or newline that should separate the two.

The base is the float checkpoint dequantized from the locked GGUF, so the adapter is trained
on exactly the weights llama.cpp runs. ``--out`` receives a standard PEFT folder
(``adapter_config.json``, ``adapter_model.safetensors``), the converted llama.cpp adapter
``adapter.gguf`` and ``training.json`` (settings, losses, timings).

Why it is fast enough on two cores: matrix products run in bfloat16 (autocast; the LoRA
weights and the optimizer stay float32), the 262k-word output layer -- costlier per token
than the whole transformer body of this model -- is evaluated only where the loss is taken,
and batches group examples of similar length so that little is spent on padding. Results
are reproducible for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeGemmaError, InvalidParameterError
from .jsonl import parse_lines

TARGET_MODULES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}  # fmt: skip
"""Short names accepted by ``--targets`` and the Hugging Face modules they stand for."""


@dataclass(frozen=True)
class TrainConfig:
    model: str = "gemma3-270m"
    """The base model: a models.lock name, a GGUF path (a Gemma 3: its float checkpoint is
    made first), or a Hugging Face checkpoint folder of any family that trains
    (:mod:`edgegemma.families`)."""
    gguf: str | None = None
    """With a checkpoint folder as ``model``: the GGUF the adapter will run on (what
    ``edgegemma convert FOLDER --to gguf`` made of it), for ``adapter.gguf``; without it only
    the PEFT adapter is written."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    max_len: int = 256
    """Examples longer than this many tokens (BOS and EOS included) are skipped."""
    seed: int = 0
    threads: int | None = None
    """Torch threads; default: the available cores."""


@dataclass(frozen=True)
class TrainResult:
    out: Path
    """The PEFT folder, which also holds ``adapter.gguf`` and ``training.json``."""
    gguf_path: Path | None
    """``adapter.gguf``, or None when trained from a checkpoint folder without ``gguf``."""
    examples: int
    skipped: int
    steps: int
    train_s: float
    """Seconds spent in optimisation steps (loading and converting excluded)."""
    examples_per_s: float
    tokens_per_s: float
    final_loss: float
    """Mean loss over the last epoch."""
    losses: list[float] = field(repr=False)
    """Loss of every step."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """The examples of a JSONL file; :class:`InvalidParameterError` names the first bad line."""
    source = Path(path)
    if source.exists() and not source.is_file():
        raise InvalidParameterError(f"training data must be a JSONL file, and {source} is not one")
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParameterError(f"training data not found: {source}") from None
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"{source} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise InvalidParameterError(f"cannot read {source}: {exc.strerror}") from None
    examples = []
    for number, record in parse_lines(text, str(source)):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), str) for key in ("prompt", "completion")
        ):
            raise InvalidParameterError(
                f'{source}:{number}: each line must be an object with string "prompt" and '
                f'"completion" fields'
            )
        if not record["completion"]:
            raise InvalidParameterError(f"{source}:{number}: the completion is empty")
        examples.append(Example(record["prompt"], record["completion"]))
    if not examples:
        raise InvalidParameterError(f"{source} holds no examples")
    return examples


def train(
    examples: Sequence[Example] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a LoRA adapter on ``examples`` and write it to ``out`` (PEFT + GGUF)."""
    _check_config(config)
    if not isinstance(examples, Sequence) or isinstance(examples, str):
        examples = read_examples(examples)
    out_dir = Path(out)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import models
    from .adapters.gguf import to_gguf
    from .adapters.peft import read_peft
    from .convert.checkpoint import float_checkpoint
    from .families import family_of_checkpoint, require
    from .gguffile import read_header

    torch.set_num_threads(config.threads or _cores())
    source = models.resolve(config.model)
    if source.is_dir():
        require(family_of_checkpoint(source).name, "train", source)
        checkpoint = source
        base_gguf = models.resolve(config.gguf) if config.gguf else None
    else:
        require(read_header(source).architecture, "train", source.name)
        checkpoint = float_checkpoint(source, progress=_say if progress else None)
        base_gguf = source
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sequences, skipped = _tokenize(examples, tokenizer, config.max_len)
    if not sequences:
        raise InvalidParameterError(f"every example is longer than max_len={config.max_len} tokens")
    if skipped and progress:
        _say(f"skipped {skipped} examples longer than {config.max_len} tokens")

    torch.manual_seed(config.seed)
    # Typed as Any: the PEFT wrapper's attributes below are read as they are at run time.
    config_type = AutoConfig.from_pretrained(checkpoint).model_type
    model: Any = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        dtype=torch.float32,
        # Gemma 2 soft-caps its attention scores, which only the eager attention computes.
        attn_implementation="eager" if config_type == "gemma2" else "sdpa",
    )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # annotated int; PEFT takes floats
        target_modules=[TARGET_MODULES[t] for t in config.targets],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = str(config.model)
    body = model.base_model.model.model
    # Frozen; a bfloat16 copy spares autocast re-casting 168M weights on every step.
    head = model.base_model.model.lm_head.weight.detach().to(torch.bfloat16)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pad_id = tokenizer.pad_token_id or 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    batches_per_epoch = len(_batches(sequences, config.batch_size, random.Random(0)))
    total_steps = batches_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay(total_steps))

    losses: list[float] = []
    epoch_means: list[float] = []
    seen_tokens = 0
    started = time.perf_counter()
    bar = _progress_bar(total_steps, progress)
    model.train()
    for epoch in range(config.epochs):
        epoch_losses = []
        for batch in _batches(sequences, config.batch_size, rng):
            ids, mask, positions, targets = _collate(batch, pad_id, torch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = torch.nn.functional.linear(
                    hidden[positions].to(torch.bfloat16), head
                ).float()
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            epoch_losses.append(loss.item())
            seen_tokens += int(mask.sum())
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}")
        epoch_means.append(sum(epoch_losses) / len(epoch_losses))
    bar.close()
    train_s = time.perf_counter() - started

    _save_peft(model, out_dir)
    gguf_path = (
        to_gguf(read_peft(out_dir), out_dir / "adapter.gguf", read_header(base_gguf))
        if base_gguf is not None
        else None
    )
    n_examples = len(sequences) * config.epochs
    result = TrainResult(
        out=out_dir,
        gguf_path=gguf_path,
        examples=len(sequences),
        skipped=skipped,
        steps=len(losses),
        train_s=train_s,
        examples_per_s=n_examples / train_s,
        tokens_per_s=seen_tokens / train_s,
        final_loss=epoch_means[-1],
        losses=losses,
    )
    record = {
        "config": asdict(config),
        "examples": result.examples,
        "skipped": skipped,
        "steps": result.steps,
        "train_s": round(train_s, 1),
        "examples_per_s": round(result.examples_per_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "epoch_losses": [round(x, 4) for x in epoch_means],
        "losses": [round(x, 4) for x in losses],
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return result


def _warmup_then_decay(total_steps: int):
    """Learning-rate factor per step: linear warm-up over 5 % of the steps, then linear to 0."""
    warmup = max(1, total_steps // 20)
    return lambda step: min(
        (step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup + 1))
    )


def _save_peft(model, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # The embeddings are frozen; saying so also stops PEFT from asking the Hub about the base.
    model.save_pretrained(out_dir, save_embedding_layers=False)
    # PEFT keeps target_modules as a set; sorted, the folder is the same on every run.
    config_path = out_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _check_config(config: TrainConfig) -> None:
    unknown = [t for t in config.targets if t not in TARGET_MODULES]
    if unknown or not config.targets:
        raise InvalidParameterError(
            f"unknown LoRA targets {unknown or '(none)'}; choose from {', '.join(TARGET_MODULES)}"
        )
    for name in ("rank", "epochs", "batch_size", "max_len"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise InvalidParameterError(f"lr must be a positive number, got {config.lr!r}")
    if not math.isfinite(config.alpha) or config.alpha <= 0:
        raise InvalidParameterError(f"alpha must be a positive number, got {config.alpha!r}")


def _tokenize(
    examples: Sequence[Example], tokenizer, max_len: int
) -> tuple[list[tuple[list[int], int]], int]:
    """(token ids, index of the first completion token) per example, and how many were too long.

    Prompt and completion are tokenized separately, as the engine tokenizes a prompt and
    then generates: training on the joint tokenization would teach token boundaries that
    never occur at inference.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sequences = []
    skipped = 0
    for example in examples:
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        ids = [bos, *prompt, *completion, eos]
        if len(ids) > max_len:
            skipped += 1
            continue
        sequences.append((ids, 1 + len(prompt)))
    return sequences, skipped


def _batches(
    sequences: list[tuple[list[int], int]], batch_size: int, rng: random.Random
) -> list[list]:
    """Shuffled batches of similar-length sequences (sorted within chunks of 32 batches)."""
    order = list(range(len(sequences)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(sequences[i][0]))
        batches += [
            [sequences[i] for i in part[j : j + batch_size]]
            for j in range(0, len(part), batch_size)
        ]
    rng.shuffle(batches)
    return batches


def _collate(batch: list[tuple[list[int], int]], pad_id: int, torch):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for row, (tokens, first) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        # The hidden state at position p predicts token p + 1.
        rows += [row] * (len(tokens) - first)
        cols += range(first - 1, len(tokens) - 1)
        targets += tokens[first:]
    return ids, mask, (torch.tensor(rows), torch.tensor(cols)), torch.tensor(targets)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="edgegemma train",
        description="Fine-tune a LoRA adapter on this CPU from prompt/completion JSONL, for "
        "Gemma 3 270M or any Gemma checkpoint folder that trains (docs/families.md).",
    )
    parser.add_argument(
        "--data", required=True, help='JSONL, one {"prompt": ..., "completion": ...} per line'
    )
    parser.add_argument(
        "--out", required=True, help="folder for the PEFT adapter, adapter.gguf and training.json"
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="base model: a models.lock name, a GGUF or a checkpoint folder (default: %(default)s)",
    )
    parser.add_argument(
        "--gguf",
        help="with a checkpoint folder: the GGUF made of it, to write adapter.gguf for",
    )
    parser.add_argument(
        "--rank", type=int, default=defaults.rank, help="LoRA rank (default: %(default)s)"
    )
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="LoRA alpha (default: %(default)s)"
    )
    parser.add_argument(
        "--targets",
        default=",".join(defaults.targets),
        help=f"comma-separated projections to adapt, of {','.join(TARGET_MODULES)} "
        "(default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="default: %(default)s")
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s"
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=defaults.max_len,
        help="longest example in tokens (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all available cores)")
    options = parser.parse_args(argv)
    config = TrainConfig(
        model=options.model,
        gguf=options.gguf,
        rank=options.rank,
        alpha=options.alpha,
        targets=tuple(t.strip() for t in options.targets.split(",") if t.strip()),
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        max_len=options.max_len,
        seed=options.seed,
        threads=options.threads,
    )
    try:
        result = train(options.data, options.out, config)
    except EdgeGemmaError as exc:
        print(f"edgegemma train: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"trained on {result.examples} examples x {config.epochs} epochs in {result.train_s:.0f} s "
        f"({result.examples_per_s:.1f} examples/s, {result.tokens_per_s:.0f} tokens/s); "
        f"final loss {result.final_loss:.3f}"
    )
    print(f"PEFT adapter: {result.out}")
    if result.gguf_path is not None:
        size = result.gguf_path.stat().st_size / 1e6
        print(f"llama.cpp adapter: {result.gguf_path} ({size:.1f} MB)")
    else:
        print(f"llama.cpp adapter: edgegemma adapters convert {result.out} --to gguf --model GGUF")
    return 0
