"""Tokenizer parity with Meta (tiktoken) and HF, chat masking, vocabulary edits and file export."""

import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.llama3_tokenizer import package_tokenizer_dir
from jaxvocab.errors import CheckpointError, VocabError, read_json
from jaxvocab.io.tokenizer_files import write_tokenizer_files
from jaxvocab.io.tokenizer_read import load_tokenizer
from jaxvocab.tokenizer import LLAMA3_SPECIALS, LLAMA31_SPECIALS, LLAMA32_VISION_SPECIALS

try:
    from tests._tok_util import (
        LLAMA3_CHAT_TEMPLATE,
        build_gpt2_style,
        dir_hashes,
        meta_encode,
        reference_tiktoken,
    )
except ImportError:
    from _tok_util import (
        LLAMA3_CHAT_TEMPLATE,
        build_gpt2_style,
        dir_hashes,
        meta_encode,
        reference_tiktoken,
    )

TOK_DIR = str(package_tokenizer_dir())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=8,
)

CORPUS = [
    "Hello, world! This is a simple sentence.",
    "I'm sure they'll say we've done what you'd've DONE. It's THEY'LL, I'M, We'Re.",
    "机器学习是人工智能的一个分支。我们今天去公园散步吧！",
    "日本語のテキストです。カタカナとひらがな、漢字が混在しています。",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "नमस्ते दुनिया, यह हिंदी में एक वाक्य है।",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "안녕하세요 세계! 한국어 문장입니다.",
    "สวัสดีชาวโลก นี่คือประโยคภาษาไทย",
    "Größenwahn über Äpfel, Öl und Übermut; straße — Fußgängerübergänge.",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2\n\telse:\n\t\treturn -x\n",
    '#include <stdio.h>\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}',
    "const f = async (a, b) => { await g(a ?? b); };\r\n// comment\r\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 rainbow flag 🏳️‍🌈 flags 🇺🇸🇯🇵🇩🇪 keycap 1️⃣",
    "lots of     spaces\t\t\ttabs\n\n\n\nnewlines   \n  trailing   ",
    "windows\r\nline\r\nendings\r\n\r\n",
    "numbers 1234567 3.14159 -0.5e10 1,000,000 2024-01-01 0x1F",
    "URL: https://example.com/path?q=1&lang=en#frag and mailto:a.b@c.org",
    " leading space",
    "",
    " ",
    "\n",
    "a" * 3000,
    "ab" * 1500 + "\n" + " " * 2000 + "x",
    "!" * 1000 + "." * 777,
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
    "Mixed: English中文日本語한국어العربيةहिन्दी🙂 end.",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("json_only")
    shutil.copy(os.path.join(TOK_DIR, "tokenizer.json"), d)
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def tok_model_only(tmp_path_factory):
    d = tmp_path_factory.mktemp("model_only")
    shutil.copy(os.path.join(TOK_DIR, "tokenizer.model"), d)
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def hf_tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(TOK_DIR, "tokenizer.json"))


@pytest.fixture(scope="module")
def ref():
    return reference_tiktoken(os.path.join(TOK_DIR, "tokenizer.model"))


def test_parity_with_tiktoken_and_hf(tok, tok_json, tok_model_only, hf_tok, ref):
    assert tok.source == "tiktoken" and tok_json.source == "hf-json" and tok_json.llama3
    for t in CORPUS:
        want = ref.encode_ordinary(t)
        assert hf_tok.encode(t, add_special_tokens=False).ids == want, t[:40]
        assert tok.encode(t) == want, t[:40]
        assert tok_json.encode(t) == want, t[:40]
        assert tok_model_only.encode(t) == want, t[:40]
        assert tok.decode(want) == t
        assert tok_json.decode(want) == t
    joined = "\n".join(CORPUS)
    assert tok.encode(joined) == hf_tok.encode(joined, add_special_tokens=False).ids
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id] + ref.encode_ordinary("hi") + [tok.eos_id]


def test_very_long_runs_follow_meta_chunking(tok, ref):
    t = "x" * 60_000 + " " * 30_000 + "end " + "word " * 90_000
    ids = tok.encode(t)
    assert ids == meta_encode(ref, t)
    assert tok.decode(ids) == t


def test_special_text_not_special_by_default(tok):
    ids = tok.encode("<|eot_id|>")
    assert len(ids) > 1 and 128009 not in ids
    assert tok.decode(ids) == "<|eot_id|>"
    assert tok.encode("<|eot_id|>", allowed_special={"<|eot_id|>"}) == [128009]
    assert tok.encode("a<|eot_id|>", allowed_special="all")[-1] == 128009
    assert tok.is_special(128009) and not tok.is_special(100)
    assert tok.id_to_piece(128009) == "<|eot_id|>" and tok.id_to_piece(9906) == "Hello"
    with pytest.raises(VocabError):
        tok.decode([10**7])


def test_specials_match_real_tokenizer_json(tok, tok_json):
    with open(os.path.join(TOK_DIR, "tokenizer.json")) as f:
        added = {e["id"]: e["content"] for e in json.load(f)["added_tokens"]}
    assert len(added) == 257  # the bundled file is Llama-3.2-Vision's: 256 + <|image|>
    for t in (tok, tok_json):
        assert {i: s for s, i in t.special_tokens.items()} == added
        assert t.n_words == 128257
        assert (t.bos_id, t.eos_id, t.eot_id, t.eom_id, t.pad_id) == (128000, 128001, 128009, 128008, 128004)
        assert t.stop_ids == [128001, 128009, 128008]
        free = t.free_reserved()
        assert len(free) == 247 and free[:3] == [128002, 128003, 128011] and free[-1] == 128255
    assert tok.special_tokens == LLAMA32_VISION_SPECIALS


def test_special_sets_without_beside_files(tok_model_only):
    assert tok_model_only.special_tokens == LLAMA31_SPECIALS
    assert len(LLAMA31_SPECIALS) == len(LLAMA3_SPECIALS) == 256
    assert set(LLAMA3_SPECIALS.values()) == set(range(128000, 128256))
    assert LLAMA3_SPECIALS["<|eot_id|>"] == 128009 and LLAMA3_SPECIALS["<|reserved_special_token_250|>"] == 128255
    free = tok_model_only.free_reserved()
    assert len(free) == 248
    assert not {128004, 128008, 128010} & set(free)
    assert free == sorted(free)
    assert tok_model_only.id_to_piece(128011) == "<|reserved_special_token_3|>"
    assert tok_model_only.id_to_piece(128255) == "<|reserved_special_token_247|>"


MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "2+2 is 4. "},
]


def test_encode_chat(tok):
    ids, mask = tok.encode_chat(MESSAGES)
    assert len(ids) == len(mask)
    e = tok.encode
    expect_ids, expect_mask = [128000], [0]
    for m in MESSAGES:
        head = [128006] + e(m["role"]) + [128007, 271]
        body = e(m["content"].strip()) + [128009]
        w = int(m["role"] == "assistant")
        expect_ids += head + body
        expect_mask += [0] * len(head) + [w] * len(body)
    assert ids == expect_ids and mask == expect_mask
    # well-known Llama-3 ids for the header pieces
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]
    assert [i for i, m in zip(ids, mask, strict=True) if m] == e("2+2 is 4.") + [128009]
    # and HF's rendering of Meta's Llama-3 chat template agrees
    with open(os.path.join(TOK_DIR, "tokenizer_config.json")) as f:
        template = json.load(f).get("chat_template") or LLAMA3_CHAT_TEMPLATE
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(TOK_DIR)
    out = hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=True, add_generation_prompt=False)
    if not isinstance(out, list):
        out = out["input_ids"]
    assert list(out) == ids


def test_encode_chat_eom_and_errors(tok):
    ids, mask = tok.encode_chat(
        [
            {"role": "user", "content": "run it"},
            {"role": "assistant", "content": "<|python_tag|>x()", "end": "eom"},
            {"role": "ipython", "content": "ok"},
        ]
    )
    k = ids.index(128008)
    assert mask[k] == 1 and 128009 in ids and mask[-1] == 0
    assert 128010 not in ids  # special text in content stays ordinary text
    with pytest.raises(VocabError):
        tok.encode_chat([{"role": "narrator", "content": "x"}])


def test_with_tokens(tok):
    t2 = tok.with_tokens(
        {128002: "<think>", 128003: "<|ctrl|>"}, {128257: "</think>", 128258: "<|tool|>"}, special={128003, 128258}
    )
    assert tok.encode("<think>") != [128002]  # original untouched
    assert t2.added == {128002: "<think>", 128003: "<|ctrl|>", 128257: "</think>", 128258: "<|tool|>"}
    assert t2.added_plain == {"<think>", "</think>"}
    assert t2.n_words == 128259
    ids = t2.encode("Q: x<think>hmm</think> y")
    assert 128002 in ids and 128257 in ids
    assert t2.decode(ids) == "Q: x<think>hmm</think> y"
    assert 128003 not in t2.encode("<|ctrl|>")  # special ones need allowing
    assert t2.encode("<|ctrl|><|tool|>", allowed_special={"<|ctrl|>", "<|tool|>"}) == [128003, 128258]
    assert t2.is_special(128003) and not t2.is_special(128002)
    assert 128002 not in t2.free_reserved() and 128011 in t2.free_reserved()
    assert len(t2.free_reserved()) == len(tok.free_reserved()) - 2
    assert t2.id_to_piece(128257) == "</think>"
    with pytest.raises(VocabError):
        tok.with_tokens({128009: "<x>"}, {})  # not a reserved slot
    with pytest.raises(VocabError):
        tok.with_tokens({}, {128000: "<x>"})  # inside the vocabulary
    with pytest.raises(VocabError):
        tok.with_tokens({}, {128300: "<|eot_id|>"})  # text already taken


def test_write_tokenizer_files_llama(tmp_path, tok):
    before = dir_hashes(TOK_DIR)
    out = tmp_path / "out"
    renamed = {128002: "<think>", 128003: "<|ctrl|>"}
    appended = {128257: "</think>", 128258: "<|tool|>"}
    written = write_tokenizer_files(TOK_DIR, out, renamed, appended, {128003, 128258}, vocab_size=128264)
    assert sorted(written) == ["tokenizer.json", "tokenizer_config.json"]
    from jaxvocab.io import carried

    assert carried.carry(TOK_DIR, out, ["tokenizer.model"]) == ["tokenizer.model"]  # parsed, re-written
    assert dir_hashes(TOK_DIR) == before
    assert (out / "tokenizer.model").read_bytes() == open(os.path.join(TOK_DIR, "tokenizer.model"), "rb").read()

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    vocab = hf.get_vocab()
    for i, s in {**renamed, **appended}.items():
        assert hf.convert_tokens_to_ids(s) == i and vocab[s] == i
    assert "<|reserved_special_token_0|>" not in vocab and "<|reserved_special_token_1|>" not in vocab
    assert len(hf) <= 128264
    assert 128002 in hf.encode("a <think> b", add_special_tokens=False)

    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]["128258"]["special"] is True
    assert cfg["added_tokens_decoder"]["128257"]["special"] is False
    tj = json.loads((out / "tokenizer.json").read_text())
    src_tj = json.load(open(os.path.join(TOK_DIR, "tokenizer.json")))
    assert tj["model"] == src_tj["model"]
    assert [e["id"] for e in tj["added_tokens"]] == sorted(e["id"] for e in tj["added_tokens"])

    # our own loader reads the edited files (tiktoken path, names from tokenizer.json) identically
    ours = load_tokenizer(out)
    planned = tok.with_tokens(renamed, appended, special={128003, 128258})
    assert ours.special_tokens == planned.special_tokens
    assert ours.added_plain == planned.added_plain == {"<think>", "</think>"}
    assert ours.encode("x<think>y</think>") == planned.encode("x<think>y</think>")
    assert 128002 in ours.encode("x<think>y") and 128003 not in ours.encode("<|ctrl|>")
    again = ours.with_tokens({128011: "<more>"}, {})
    assert again.added_plain == {"<think>", "</think>", "<more>"}

    with pytest.raises(VocabError):
        write_tokenizer_files(TOK_DIR, tmp_path / "small", renamed, appended, {128003}, vocab_size=128258)
    with pytest.raises(VocabError):
        write_tokenizer_files(TOK_DIR, tmp_path / "taken", {}, {128256: "<x>"}, set(), vocab_size=128300)
    with pytest.raises(VocabError):
        write_tokenizer_files(TOK_DIR, tmp_path / "pad", {128004: "<x>"}, {}, set(), vocab_size=128300)
    assert dir_hashes(TOK_DIR) == before


def test_write_tokenizer_files_gpt2_style(tmp_path):
    src = tmp_path / "src"
    specials = build_gpt2_style(str(src))
    assert specials == {"<s>": 0, "</s>": 1, "<pad>": 2}
    before = dir_hashes(str(src))
    base = load_tokenizer(src)
    assert base.source == "hf-json" and not base.llama3
    assert base.bos_id == 0 and base.eos_id == 1
    with pytest.raises(VocabError, match="pre-tokenized"):
        base.encode("hello")
    n = base.n_words
    grown = base.with_tokens({}, {n: "<x>"})
    assert (grown.bos_id, grown.eos_id, grown.n_words) == (0, 1, n + 1)
    appended = {n: "<|user|>", n + 1: "<tag>"}
    written = write_tokenizer_files(src, tmp_path / "out", {}, appended, {n}, vocab_size=n + 8)
    assert sorted(written) == ["tokenizer.json", "tokenizer_config.json"]
    assert dir_hashes(str(src)) == before

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for i, s in appended.items():
        assert hf.convert_tokens_to_ids(s) == i
    assert hf.convert_tokens_to_ids("<s>") == 0 and len(hf) == n + 2
    assert n + 1 in hf.encode("hello <tag> world", add_special_tokens=False)
    edited = load_tokenizer(tmp_path / "out")
    assert {edited.special_tokens[s] for s in appended.values()} == set(appended)
    assert edited.decode([n + 1]) == "<tag>"
    with pytest.raises(VocabError):
        write_tokenizer_files(src, tmp_path / "o2", {}, appended, set(), vocab_size=n + 1)


def test_tiktoken_load_decodes_only_added_tokens_of_tokenizer_json(tmp_path):
    """Beside tokenizer.model only tokenizer.json's added_tokens are read (the 9 MB model section is
    not decoded): the special tokens are those of a full parse, and a damaged model section goes
    unnoticed there while a damaged added_tokens list is one error naming the file."""
    full = load_tokenizer(TOK_DIR)
    tj = json.loads(open(os.path.join(TOK_DIR, "tokenizer.json"), encoding="utf-8").read())
    assert list(tj)[:4] == ["version", "truncation", "padding", "added_tokens"]  # as HF writes it
    assert read_json(os.path.join(TOK_DIR, "tokenizer.json"), member="added_tokens") == tj["added_tokens"]
    shutil.copy(os.path.join(TOK_DIR, "tokenizer.model"), tmp_path / "tokenizer.model")
    text = json.dumps({k: tj[k] for k in ("version", "truncation", "padding", "added_tokens")}, indent=2)
    (tmp_path / "tokenizer.json").write_text(text[:-2] + ', "model": {"vocab": {"a": ')  # cut mid-model
    assert load_tokenizer(tmp_path).special_tokens == full.special_tokens
    (tmp_path / "tokenizer.json").write_text(text[: text.index('"added_tokens"') + 40])
    with pytest.raises(CheckpointError, match=r"tokenizer.json: invalid JSON"):
        load_tokenizer(tmp_path)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=5),
    st.text(max_size=4),
    st.sampled_from([None, 0, 2]),
)
def test_read_json_member_matches_a_full_parse(tmp_path_factory, obj, key, indent):
    path = tmp_path_factory.mktemp("j") / "f.json"
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert read_json(path, member=key) == obj.get(key)


@pytest.mark.parametrize("text", ["{not json", "[1]", '{"a": 1,}', '{"a" 1}', '{"a": 1 "b": 2}', "", '{"a": '])
def test_read_json_member_refuses_what_json_refuses(tmp_path, text):
    (tmp_path / "f.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"f.json: invalid JSON \(.*: line 1 column \d+\)"):
        read_json(tmp_path / "f.json", member="b")


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"\x0a\x0b\x00garbage protobuf")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(bad)
