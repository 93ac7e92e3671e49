"""Chat records, the layout the course fine-tunes on: ``{"messages": [user, assistant]}``.

One conversion from an instruction row (Dolly's ``instruction``, ``context``, ``response``)
to a chat record serves the whole course: the data preparation
(:func:`course_lib.data.read_records`) and the tiny model's pretraining corpus
(:func:`course_lib.tiny_model.load_corpus`).
"""

from __future__ import annotations


def to_chat_record(row: dict) -> dict:
    """A Dolly row as a chat record ``{"messages": [user, assistant]}``.

    The user turn is the instruction, then a blank line and the context when the context is
    not empty; the assistant turn is the response. Surrounding white space is stripped.
    """
    user = row["instruction"].strip()
    context = row.get("context", "").strip()
    if context:
        user = f"{user}\n\n{context}"
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": row["response"].strip()}]}
