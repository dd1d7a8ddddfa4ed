"""Label masks at the prompt/reply boundary, with a tokenizer whose tokens cross it."""

from __future__ import annotations

from llmneo.data import templates
from llmneo.demo import tiny

IGNORE = -100


def test_a_token_straddling_the_reply_boundary_is_trained():
    # Byte-level BPE trained so that " yo" is ONE token whose offsets include its leading space. In the
    # default template the space belongs to the prompt ("Assistant: ") and "yo" to the reply, so this
    # token straddles the boundary; it carries reply text, so it must be a target.
    tok = tiny.build_tokenizer(corpus=["Human: hi Assistant: yo yo yo Hello Hello Hello"] * 50, vocab_size=300,
                               chat_template=None)
    [yo] = tok(" yo", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, labels = templates.encode_conversation(tok, templates.BUILTIN_TEMPLATES["default"], messages)
    assert tok.decode(ids) == "<s>Human: hi\nAssistant: yo</s>\n"
    at = ids.index(yo)
    assert labels[at] == yo
    assert labels == [IGNORE] * at + [yo, tok.eos_token_id, IGNORE]
