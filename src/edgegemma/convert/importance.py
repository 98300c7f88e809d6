"""Measure a model's output-matrix importance weights (:mod:`edgegemma.importance` ships them).

python -m edgegemma.convert.importance gemma3-270m     # rewrites data/importance/gemma3-270m.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import sha256_file, write_atomically
from ..importance import DATA

CALIBRATION_OPENINGS = (
    "The", "Once upon a time", "In 1998, the city council", "Ingredients:", "The theory of",
    "Dear Sir,", "Chapter 1\n\n", "How to fix a", "The results show that", "My favourite",
    "Q: What is", "News:", "import numpy as np\n", "Le", "1.", "Today I learned",
)  # fmt: skip
"""Where the calibration text starts: one sample of each, seeds 0, 1, ..."""
CALIBRATION_TOKENS = 192
"""Tokens sampled after each opening (temperature 1, no truncation of the distribution)."""


def calibration_texts(
    model: Path,
    openings: Sequence[str] = CALIBRATION_OPENINGS,
    tokens: int = CALIBRATION_TOKENS,
) -> list[str]:
    """The model's own text: each opening and what the model samples after it (seeds 0, 1, ...)."""
    from .. import load as load_engine

    with load_engine(model, n_ctx=1024) as engine:
        return [
            opening
            + engine.generate(
                opening, max_tokens=tokens, temperature=1.0, top_k=0, top_p=1.0, seed=seed
            ).text
            for seed, opening in enumerate(openings)
        ]  # fmt: skip


def measure(
    model: Path,
    openings: Sequence[str] = CALIBRATION_OPENINGS,
    tokens: int = CALIBRATION_TOKENS,
) -> tuple[np.ndarray, int]:
    """``E[h_j^2]`` over the model's own calibration text, and the number of tokens seen."""
    import llama_cpp

    texts = calibration_texts(model, openings, tokens)
    # With pooling off, llama.cpp's "embeddings" are each token's final hidden state after the
    # last norm: the output matrix's input.
    runtime = llama_cpp.Llama(
        str(model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, n_ctx=1024,
        n_batch=1024, n_ubatch=1024, verbose=False,
    )  # fmt: skip
    squares, count = None, 0
    for text in texts:
        hidden = np.asarray(runtime.embed(text, normalize=False), dtype=np.float64)
        total = (hidden * hidden).sum(axis=0)
        squares = total if squares is None else squares + total
        count += len(hidden)
    runtime.close()
    assert squares is not None
    return (squares / count).astype(np.float32), count


def main(argv: Sequence[str] | None = None) -> int:
    from .. import models

    parser = argparse.ArgumentParser(
        prog="python -m edgegemma.convert.importance",
        description="Measure a models.lock model's output-matrix importance weights and write "
        "them to edgegemma's data/importance/NAME.json.",
    )
    parser.add_argument("name", help="models.lock name, e.g. gemma3-270m")
    args = parser.parse_args(argv)
    model = models.fetch(args.name)
    values, count = measure(model)
    DATA.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.name,
        "model_sha256": sha256_file(model),
        "what": "E[h_j^2] of the final hidden state (the output matrix's input) over the "
        "model's own calibration text: python -m edgegemma.convert.importance",
        "tokens": count,
        "values": [float(v) for v in values],
    }
    out = DATA / f"{args.name}.json"
    write_atomically(out, json.dumps(record, indent=1) + "\n")
    print(f"{out}: {len(values)} columns from {count} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
