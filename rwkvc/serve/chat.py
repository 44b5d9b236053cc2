"""The chat template of the RWKV World models, and the prompt as segments.

    System: {system}\n\n            (each system message, if any)
    User: {user}\n\n
    Assistant: {reply}\n\n          (earlier replies)
    User: {user}\n\n
    Assistant:                      (the model continues from here; no trailing space)

This is the format the World models were tuned on (and `rwkvc run --chat`'s). A message's blank lines
("\\n\\n", which end a turn in this format) are folded to single newlines, and generation stops at "\\n\\n"
(a turn's end) as well as at the end-of-document token 0 and the request's own stop strings.

Each message is tokenized on its own and the token lists are concatenated, so a conversation's tokens are
a prefix of its continuation's: the state after the system prompt or after earlier turns is found again in
the prefix cache (rwkvc.serve.cache) whatever follows.
"""
from __future__ import annotations

import re

from rwkvc.errors import RwkvcError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_END = "\n\n"
CHAT_STOPS = ("\n\nUser:", TURN_END)


def clean(text: str) -> str:
    """A message's text with its blank lines folded (the format's turn separator cannot appear inside)."""
    return re.sub(r"\n\s*\n", "\n", text.replace("\r\n", "\n")).strip()


def message_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise RwkvcError("message content parts must be {'type': 'text', 'text': ...}; this model reads text only")
            parts.append(p["text"])
        return "".join(parts)
    raise RwkvcError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def chat_segments(messages: list[dict]) -> list[str]:
    """The prompt's texts, one a message, then the "Assistant:" the reply follows."""
    if not messages:
        raise RwkvcError("messages must hold at least one message")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise RwkvcError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        out.append(f"{ROLES[role]}: {clean(message_text(m.get('content', '')))}{TURN_END}")
    out.append(f"{ROLES['assistant']}:")
    return out


def chat_prompt(messages: list[dict]) -> str:
    """The template as one text (for display and for clients that want the raw prompt)."""
    return "".join(chat_segments(messages))
