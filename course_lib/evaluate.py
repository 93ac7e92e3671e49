"""Generation with and without an adapter, and a simple measured style score.

The style score is the share of words in a text that only a pirate would say (``arr``,
``matey``, ``ye``, ``o'``, ``sailin'``...). Words that plain English also uses (``be``,
``me``, ``sea``, ``ship``) are left out on purpose, so the base model's plain answers
score near zero and the score measures the style the fine-tune taught, not the topic.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def generate_answers(model_path: str | Path, prompts: list[str], adapter_path=None,
                     max_tokens: int = 60) -> list[str]:
    """Greedy answers (deterministic) of a model, with an optional adapter, to ``prompts``.

    Each prompt is a user turn in the model's chat template; ``mlx_lm`` loads the model
    (``mlx_lm.load(model, adapter_path=...)``) and generates up to ``max_tokens`` tokens.
    """
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_path),
                            adapter_path=str(adapter_path) if adapter_path else None)
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
        answers.append(generate(model, tokenizer, ids, max_tokens=max_tokens).strip())
    return answers
