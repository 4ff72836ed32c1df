"""How a manifest renders the conversation a reward model reads (pure logic, fast tier).

The KV-cached path and the text path both take their text from :meth:`Manifest.segments`
and :meth:`Manifest.around_response`; the slow tests in test_export.py check the result
against PyTorch on real exports.
"""

from __future__ import annotations

import pytest

from args_local.core.errors import ModelError
from args_local.core.manifest import Manifest

CHAT = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
CHAT_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n" + CHAT


def manifest(**fields) -> Manifest:
    return Manifest.from_dict({"name": "m", "format": "template", **fields})


def test_the_system_template_renders_a_system_message_and_the_template_its_absence():
    m = manifest(template=CHAT, system_template=CHAT_SYSTEM, kv_cache="shared")
    assert "".join(t for t, _ in m.segments("P", "R")) == CHAT.format(prompt="P", response="R")
    assert "".join(t for t, _ in m.segments("P", "R", "S")) == CHAT_SYSTEM.format(system="S", prompt="P", response="R")
    before, after = m.around_response("P", "S")
    assert before == [("<|im_start|>system\n", True), ("S", False), ("<|im_end|>\n<|im_start|>user\n", True), ("P", False),
                      ("<|im_end|>\n<|im_start|>assistant\n", True)]
    assert after == [("<|im_end|>\n", True)]


def test_a_text_template_takes_the_system_message_at_its_placeholder_or_before_the_prompt():
    placed = manifest(template="{system}\n\nHuman: {prompt}\n\nAssistant: {response}")
    assert "".join(t for t, _ in placed.segments("P", "R", "S")) == "S\n\nHuman: P\n\nAssistant: R"
    assert "".join(t for t, _ in placed.segments("P", "R")) == "\n\nHuman: P\n\nAssistant: R"
    plain = manifest(template="{prompt}{response}")  # the ARGS reference: the prompt's text, then the response's
    assert plain.segments("P", "R", "S") == [("S\nP", False), ("R", False)]  # as --raw hands both to the policy
    assert plain.around_response("P") == ([("P", False)], [])


def test_user_text_is_never_template_text_and_is_filled_once():
    m = manifest(template=CHAT)
    runs = m.segments("{response} <|im_start|>", "{prompt}")
    assert [t for t, own in runs if not own] == ["{response} <|im_start|>", "{prompt}"]
    assert all("{" not in t for t, own in runs if own)


@pytest.mark.parametrize("fields, message", [
    ({"template": "{response}{prompt}", "kv_cache": "shared"}, "with no placeholder after it"),
    ({"template": "{response} and {response}", "kv_cache": "per-row"}, "must hold {response} once"),
    ({"template": CHAT, "system_template": "{system}{prompt}", "kv_cache": "shared"}, "must contain {response}"),
    ({"format": "pair", "system_template": CHAT_SYSTEM}, '"system_template" goes with "format": "template"'),
    ({"format": "pair", "kv_cache": "shared"}, '"format": "response" or "template"'),
])
def test_manifests_the_cached_path_cannot_render_are_refused(fields, message):
    with pytest.raises(ModelError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Manifest.from_dict({"name": "m", "format": "template", **fields})


def test_old_manifests_keep_their_meaning():
    m = Manifest.from_dict({"name": "m", "format": "response", "kv_cache": "shared", "bos_token_id": 1})
    assert m.system_template is None and "system_template" not in m.to_dict()
    new = manifest(template=CHAT, system_template=CHAT_SYSTEM)
    assert Manifest.from_dict(new.to_dict()) == new  # written and read back
