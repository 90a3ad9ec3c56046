"""Translation, summarization and chat on top of generation (decoder-only models here)."""

import json

import pytest

from tests.tiny import save_tiny
from tokenloom import tasks
from tokenloom.errors import PromptError
from tokenloom.tokenizer.chat_template import ChatTemplateError, render_chat

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import tokenloom

    folder = tmp_path_factory.mktemp("llama")
    save_tiny("llama", folder)
    return tokenloom.load(folder)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    import tokenloom

    folder = tmp_path_factory.mktemp("llama_chat")
    save_tiny("llama", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return tokenloom.load(folder)


def test_split_into_chunks_fits_window_and_keeps_text(model):
    text = " ".join(f"Sentence number {i} is about the fox." for i in range(40))
    chunks = tasks.split_into_chunks(model, text, 30)
    assert len(chunks) > 3
    assert all(len(model.tokenizer.encode(c, add_special_tokens=False)) <= 30 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_decoder_only_translate_uses_an_instruction(model):
    out = model.translate(["The fox sleeps.", "A bird sings."], target="fr", max_new_tokens=5, ignore_eos=True)
    assert isinstance(out, list) and len(out) == 2
    prompt = tasks._instruction_ids(model, "Translate the following text to French. Reply with the translation only.",
                                    "The fox sleeps.")
    expected = model.generate_ids([prompt], model.generation_config(max_new_tokens=5, ignore_eos=True))[0]
    assert out[0] == expected.text.strip()


def test_summarize_long_document_in_chunks(model, monkeypatch):
    monkeypatch.setattr(tasks, "_window", lambda m: 48)
    calls = []
    real = tasks._generate
    monkeypatch.setattr(tasks, "_generate", lambda m, ids, p: calls.append(len(ids)) or real(m, ids, p))
    doc = " ".join(f"The fox ran to the river on day {i}." for i in range(30))
    summary = model.summarize(doc, max_new_tokens=4, ignore_eos=True)
    assert isinstance(summary, str) and calls[0] > 1  # the first call summarized several chunks at once


def test_chat_uses_the_template(chat_model):
    ids = chat_model.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    text = chat_model.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<s>user: Hi</s><s>assistant:"
    g = chat_model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3, ignore_eos=True)
    assert len(g.token_ids) == 3 and g.prompt_tokens == len(ids)


def test_chat_without_template_and_bad_messages(model, chat_model):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        model.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(ChatTemplateError, match="message 0"):
        chat_model.chat([{"role": "user"}])


def test_template_is_sandboxed():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(evil, [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="boom"):
        render_chat("{{ raise_exception('boom') }}", [])


def test_empty_text_is_refused(model):
    with pytest.raises(PromptError):
        model.translate("  ", target="de")
    with pytest.raises(PromptError):
        model.summarize("")
