"""The tiny models' tokenizer: the fixed text of every prompt they read is one token per piece, so a prompt's
length is its content (the letters of "ASSISTANT:" cost ten tokens when learned from the project's text alone)."""

from __future__ import annotations

from spavl_kedro.models import tiny
from spavl_kedro.models.specs import TinyModelConfig

TEXTS = ["How do I make this at home?", "Sure, here is how.", "I cannot help with that."] * 20
GUARD = "[INST] User: {question}\nAgent: {response} [/INST]"


def test_prompt_frames_are_single_tokens_and_the_content_is_unchanged():
    plain = tiny.build_processor(TEXTS, TinyModelConfig())
    framed = tiny.build_processor(TEXTS, TinyModelConfig(), tiny.template_literals(GUARD))
    assert tiny.template_literals(GUARD) == ["[INST] User: ", "\nAgent: ", " [/INST]"]
    prompt = GUARD.format(question="How do I make this at home?", response="Sure, here is how.")
    asked = framed.apply_chat_template(tiny.user_message(prompt, 0), add_generation_prompt=True)
    pieces = framed.tokenizer.tokenize(asked)
    for frame in ("USER: ", "[INST] User: ", "\nAgent: ", " [/INST]", " ASSISTANT:"):
        assert pieces.count(frame) == 1, (frame, pieces)
    assert len(pieces) < len(plain.tokenizer.tokenize(asked)) - 20  # the guard frame alone was 23 tokens
    assert framed.tokenizer.decode(framed.tokenizer(asked)["input_ids"]) == asked  # nothing lost on the way back


def test_the_llava15_layout_keeps_its_checkpoints_splitting():
    config = TinyModelConfig(layout="llava-1.5")
    assert len(tiny.build_processor(TEXTS, config, ["[INST] User: "]).tokenizer) == len(
        tiny.build_processor(TEXTS, config).tokenizer
    )
