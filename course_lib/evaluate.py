"""Generation with and without an adapter, and a simple measured style score.

The style score is the share of words in a text that only a pirate would say (``arr``,
``matey``, ``ye``, ``o'``, ``sailin'``...). Words that plain English also uses (``be``,
``me``, ``sea``, ``ship``) are left out on purpose, so the base model's plain answers
score near zero and the score measures the style the fine-tune taught, not the topic.

CLI: ``python -m course_lib.evaluate ADAPTER_PATH [PROMPT ...]`` prints the base model's and
the adapter's answers side by side (the held-out questions by default).
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads: see course_lib.blas
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import re
import sys
from pathlib import Path

from course_lib.fine_tune.batches import pad_batch
from course_lib.models import ModelError, resolve

PIRATE_WORDS = frozenset({
    "arr", "arrr", "ahoy", "aye", "avast", "matey", "mateys", "ye", "yer", "yarr", "hearty",
    "hearties", "landlubber", "landlubbers", "o'", "'tis", "savvy", "shiver", "timbers",
    "booty", "scallywag", "scallywags", "buccaneer", "buccaneers", "grog", "doubloons",
    "swashbuckler", "blimey",
})
_WORD = re.compile(r"'?[a-z]+(?:'[a-z]*)?", re.IGNORECASE)


def pirate_word_share(text: str) -> float:
    """Share (0.0 to 1.0) of the words in ``text`` that are pirate words: those in
    :data:`PIRATE_WORDS`, or dropping a final g for an apostrophe (``sailin'``).
    0.0 for a text with no words."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return 0.0
    pirate = sum(1 for w in words if w in PIRATE_WORDS or (w.endswith("in'") and len(w) > 4))
    return pirate / len(words)


# Questions that no row of data-sets/ asks, nor anything close (a test in
# tests/test_launch_and_evaluate.py checks), to compare answers before and after a
# fine-tune on what it never saw.
HELD_OUT_PROMPTS = (
    "What is a black hole?",
    "What happens to the economy when interest rates rise?",
    "What do I need to get a passport for the first time?",
    "How do I make a paper airplane that flies far?",
)

# Greedy decoding makes small models repeat themselves ("a passport be a passport, and a
# passport be a passport..."); a repetition penalty over the last 20 tokens (CTRL, Keskar
# et al. 2019, as mlx_lm's make_logits_processors implements it) keeps answers readable
# and deterministic. 1.15 was chosen by reading SmolLM2's answers before and after the
# fine-tune: with 1.0 two of four adapter answers looped; with 1.15 none did.
REPETITION_PENALTY = 1.15


def generate_answers(model_path: str | Path, prompts: list[str], adapter_path=None,
                     max_tokens: int = 60,
                     repetition_penalty: float = REPETITION_PENALTY) -> list[str]:
    """Greedy answers (deterministic) of a model, with an optional adapter, to ``prompts``.

    Each prompt is a user turn in the model's chat template; ``mlx_lm`` loads the model
    (``mlx_lm.load(model, adapter_path=...)``) and generates up to ``max_tokens`` tokens,
    with ``repetition_penalty`` (1.0: none) on the last 20 tokens.
    """
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = load(str(model_path),
                            adapter_path=str(adapter_path) if adapter_path else None)
    processors = (make_logits_processors(repetition_penalty=repetition_penalty)
                  if repetition_penalty != 1.0 else None)
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
        answers.append(generate(model, tokenizer, ids, max_tokens=max_tokens,
                                logits_processors=processors).strip())
    return answers


def compare(model: str, adapter_path, prompts=HELD_OUT_PROMPTS, max_tokens: int = 80
            ) -> list[dict]:
    """The base model's and the adapter's answers to ``prompts`` side by side:
    ``[{"prompt", "base", "adapter", "base_score", "adapter_score"}]`` (scores from
    :func:`pirate_word_share`). ``model`` is a course model name or a folder."""
    path = resolve(model)
    base = generate_answers(path, list(prompts), max_tokens=max_tokens)
    tuned = generate_answers(path, list(prompts), adapter_path=adapter_path,
                             max_tokens=max_tokens)
    return [{"prompt": p, "base": b, "adapter": a, "base_score": pirate_word_share(b),
             "adapter_score": pirate_word_share(a)} for p, b, a in zip(prompts, base, tuned)]


def answer_loss(model, tokenizer, records: list[dict], batch_size: int = 8) -> float:
    """Mean token loss (nats per token) of the assistant answers of chat ``records``
    (``{"messages": [...]}``), the prompts masked as ``--mask-prompt`` masks them.

    The number a language model is judged by: how surprised it is by each answer token.
    ``model`` and ``tokenizer`` as ``mlx_lm.load`` returns them; rows are batched
    ``batch_size`` at a time, padded as the fine-tune pads them.
    """
    import types

    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.tuner.trainer import default_loss

    dataset = create_dataset(records, tokenizer, types.SimpleNamespace(mask_prompt=True))
    rows = [dataset.process(dataset[i]) for i in range(len(dataset))]
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        tokens, lengths = pad_batch(chunk, max(len(t) for t, _ in chunk) + 1, multiple=1)
        loss, n = default_loss(model, tokens, lengths)
        total, count = total + loss.item() * n.item(), count + n.item()
    return total / count


def main(argv: list[str] | None = None) -> int:
    """``python -m course_lib.evaluate ADAPTER_PATH [PROMPT ...]``: base vs adapter answers."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m course_lib.evaluate",
        description="Answers of the base model and of the model with a LoRA adapter, side by "
                    "side (greedy, repetition penalty %.2f)." % REPETITION_PENALTY)
    parser.add_argument("adapter_path", help="a fine-tune's --adapter-path folder")
    parser.add_argument("prompts", nargs="*", help="questions (default: the held-out ones)")
    parser.add_argument("--model", help="base model (default: the one in adapter_config.json)")
    parser.add_argument("--max-tokens", type=int, default=80)
    args = parser.parse_args(argv)
    config_file = Path(args.adapter_path) / "adapter_config.json"
    if not config_file.is_file():
        parser.error(f"{config_file}: no such file (is {args.adapter_path} a fine-tune's "
                     "--adapter-path?)")
    config = json.loads(config_file.read_text())
    model = args.model or config.get("model_name") or config.get("model")
    if not model:
        parser.error(f"{config_file} names no model: pass --model")
    try:
        rows = compare(model, args.adapter_path, args.prompts or HELD_OUT_PROMPTS,
                       args.max_tokens)
    except (ModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"Q: {row['prompt']}")
        print(f"  base model   (style {row['base_score']:.2f}): {row['base']}")
        print(f"  with adapter (style {row['adapter_score']:.2f}): {row['adapter']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
