"""The fixed prompt templates of the ``synth`` stage: what the generator is asked, per task.

Templates are code, not configuration: a user picks a task and a style, never a template string, so
nothing read from a config is ever rendered or executed. Changing one changes :data:`PROMPTS_VERSION`,
which is part of the stage's fingerprint (through the stage version), so a cached dataset never
mixes two prompt sets.

- **rephrase** (Maini et al. 2024, "Rephrasing the Web", WRAP): the paper's system prompt and its
  style instructions, verbatim: ``wikipedia`` (its "medium" style: diverse, high-quality English as
  on Wikipedia) and ``qa`` (a conversation of ``Question:``/``Answer:`` turns).
- **instructions**: two requests per document, so no free-form output has to be parsed: first an
  instruction the document answers, written to stand on its own; then the answer, written with the
  document in view.
- **preferences**: the instruction as above, then two answers: ``chosen`` written with the
  document in view (grounded), ``rejected`` written without it (the instruction alone), the
  contrast RLCD and grounded-vs-ungrounded distillation use to make pairs without a judge.

Messages are ``(role, content)`` pairs. A model with a chat template gets them through it; one
without gets :func:`render_plain`, WRAP's Vicuna-style ``USER: ... ASSISTANT:`` transcript, and
stops at the next ``USER:`` turn (:data:`PLAIN_STOP`).
"""
from __future__ import annotations

PROMPTS_VERSION = "1"

# WRAP's system prompt (Maini et al. 2024, section 3 / appendix), used for every task
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the questions.")

# WRAP's style instructions, verbatim; the document follows on the next line
STYLES = {
    "wikipedia": ("For the following paragraph give me a diverse paraphrase of the same in high quality English "
                  "language as in sentences on Wikipedia:"),
    "qa": ('Convert the following paragraph into a conversational format with multiple tags of "Question:" '
           'followed by "Answer:":'),
}

INSTRUCTION = ("Read the document below and write one question or instruction that a user could ask and that the "
               "document answers. It must make sense on its own, without the document. Write only the question "
               "or instruction.")
ANSWER = "Answer the question below using the document. Write only the answer."

PLAIN_STOP = ("\nUSER:",)

Messages = tuple[tuple[str, str], ...]


def rephrase(style: str, document: str) -> Messages:
    """WRAP's request to rephrase ``document`` in ``style`` (``wikipedia`` or ``qa``)."""
    if style not in STYLES:
        raise ValueError(f"unknown rephrase style {style!r}: one of {', '.join(STYLES)}")
    return (("system", SYSTEM), ("user", f"{STYLES[style]}\n\n{document}"))


def instruction(document: str) -> Messages:
    """Ask for one self-contained instruction that ``document`` answers."""
    return (("system", SYSTEM), ("user", f"{INSTRUCTION}\n\nDocument:\n{document}"))


def grounded_answer(document: str, question: str) -> Messages:
    """Ask for the answer to ``question`` with ``document`` in view (SFT responses, chosen replies)."""
    return (("system", SYSTEM), ("user", f"{ANSWER}\n\nDocument:\n{document}\n\nQuestion: {question}"))


def ungrounded_answer(question: str) -> Messages:
    """The question alone, as a user would ask it (rejected replies)."""
    return (("system", SYSTEM), ("user", question))


def render_plain(messages: Messages) -> str:
    """A transcript for a model without a chat template: WRAP's Vicuna-style format, ending where the
    assistant's turn begins."""
    lines = []
    for role, content in messages:
        if role == "system":
            lines.append(content)
        elif role == "user":
            lines.append(f"USER: {content}")
        else:
            lines.append(f"ASSISTANT: {content}")
    return "\n".join(lines) + "\nASSISTANT:"


__all__ = ["PROMPTS_VERSION", "SYSTEM", "STYLES", "PLAIN_STOP", "Messages", "rephrase", "instruction",
           "grounded_answer", "ungrounded_answer", "render_plain"]
