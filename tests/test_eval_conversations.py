"""Instruct models judged on conversations: the built-in held-out set, the assistant turns found in the chat
template, scored there only, and the figures in eval.json, the manifest, eval.md and the card."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.corpus import assistant_tokens, builtin_conversations, builtin_texts, conversation_windows
from pipeline.model import ModelSpec, load_config, load_model, resolve
from pipeline.recipe import ConversationsSpec, RecipeError, Setting, load_recipe, shown
from pipeline.tiny import CHAT_TEMPLATE
from pipeline.validate import HeldOut, compare_models, held_out_set

CONVERSATION = [{"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A mutable sequence."},
                {"role": "user", "content": "And a tuple?"},
                {"role": "assistant", "content": "An immutable one."}]


@pytest.fixture(scope="module")
def tiny():
    """The tiny -it-shaped E2B (Gemma 4's turn markers in its chat template): its tokenizer and model."""
    source = resolve(ModelSpec(id="tiny:e2b"))
    return AutoTokenizer.from_pretrained(source.ref), source, load_config(source)


def _with_template(tokenizer, template: str):
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = template
    return other


def test_the_assistant_tokens_are_the_answers_as_the_template_writes_them(tiny):
    tokenizer, _, _ = tiny
    ids, assistant = assistant_tokens(tokenizer, CONVERSATION)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode([i for i, a in zip(ids, assistant) if a]) == \
        "A mutable sequence.<turn|>\nAn immutable one.<turn|>\n"
    # transformers' own mask, where the template marks the answers with {% generation %}, agrees
    marked = CHAT_TEMPLATE.replace("<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n",
                                   "<|turn>{{ role }}\n{% if role == 'model' %}{% generation %}"
                                   "{{ message['content'] | trim }}<turn|>\n{% endgeneration %}"
                                   "{% else %}{{ message['content'] | trim }}<turn|>\n{% endif %}")
    assert "{% generation %}" in marked
    assert assistant_tokens(_with_template(tokenizer, marked), CONVERSATION) == (ids, assistant)
    # Gemma 4's larger templates prompt for generation with an empty thought channel a finished turn lacks
    thinking = CHAT_TEMPLATE.replace("<|turn>model\n{% endif %}", "<|turn>model\n<|channel>thought\n<channel|>{% endif %}")
    assert thinking != CHAT_TEMPLATE
    assert assistant_tokens(_with_template(tokenizer, thinking), CONVERSATION) == (ids, assistant)


def test_the_builtin_conversations_are_the_held_out_pages_never_calibration_s():
    held_out, calibration = builtin_conversations("eval"), builtin_conversations("calibration")
    calibration_pages = "\n".join(builtin_texts("calibration"))
    # A calibration topic can hold a held-out one whole (`compound` holds `for`): those are left out.
    assert len(held_out) == sum(page.partition("\n")[2].lstrip("*").strip() not in calibration_pages
                                for page in builtin_texts("eval")) >= 12
    assert len(calibration) == len(builtin_texts("calibration"))
    assert [{"role": "user", "content": 'Explain this part of Python: The "break" statement.'}] in [c[:1] for c in held_out]
    for question, answer in held_out:
        assert question["role"] == "user" and question["content"].startswith("Explain this part of Python: ")
        assert answer["role"] == "assistant" and len(answer["content"]) > 300
        assert any(page.rstrip().endswith(answer["content"]) for page in builtin_texts("eval"))
        assert answer["content"] not in calibration_pages
    assert not {q["content"] for q, _ in held_out} & {q["content"] for q, _ in calibration}


def test_a_conversation_window_scores_the_positions_before_an_assistant_token(tiny):
    """Offline (the tests run with HF_HUB_OFFLINE=1), through the recipe's `eval.conversations: builtin`."""
    tokenizer, _, _ = tiny
    held = held_out_set(ConversationsSpec(samples=3, seq_len=96), tokenizer)
    ids, assistant = assistant_tokens(tokenizer, builtin_conversations("eval")[0])
    assert held.windows.shape == held.scored.shape == (3, 96)
    assert held.windows[0].tolist() == ids[:96] and held.scored[0].tolist() == assistant[1:96] + [False]
    short, scored = conversation_windows(tokenizer, [CONVERSATION], 1, 96)  # padded after its end, never scored
    length = len(assistant_tokens(tokenizer, CONVERSATION)[0])
    assert (short[0, length:] == tokenizer.pad_token_id).all() and not scored[0, length - 1:].any()


class _Perturbed(torch.nn.Module):
    """The model with its logits replaced by noise at chosen positions of the held-out windows."""

    def __init__(self, model, held: HeldOut, positions: torch.Tensor):
        super().__init__()
        self.model, self.held, self.positions = model, held, positions

    def forward(self, input_ids):
        output = self.model(input_ids=input_ids)
        if input_ids.shape == self.held.windows[:1].shape:  # not compare_models' first short forward
            row = (self.held.windows == input_ids).all(-1).nonzero().item()
            noise = torch.randn(output.logits.shape, generator=torch.Generator().manual_seed(row)) * 10
            output.logits = torch.where(self.positions[row, None, :, None], noise.to(output.logits.dtype), output.logits)
        return output


def test_conversations_are_scored_on_the_assistant_turns_only(tiny, tmp_path):
    """A model that predicts the user turns (and the template's own tokens) differently scores exactly as the
    reference itself; one that predicts a single answer token differently does not."""
    tokenizer, source, config = tiny
    held = held_out_set(ConversationsSpec(samples=2, seq_len=64), tokenizer)
    model = load_model(source, config)

    def quality(other):
        compared = compare_models(lambda: model, lambda: other, [held], tmp_path, tokenizer, [], 1, (torch.float32,),
                                  torch.float32)
        return compared.figures[0].quality[torch.float32]

    prompt = ~held.scored & (held.windows != tokenizer.pad_token_id)
    assert prompt.sum() > 20 and held.scored.sum() > 60
    itself, prompt_changed = quality(load_model(source, config)), quality(_Perturbed(load_model(source, config), held, prompt))
    assert (itself.kl_mean, itself.top1_agreement, itself.ppl_ratio) == (0, 1, 1)
    assert prompt_changed == itself and itself.tokens == held.scored.sum().item()
    one_answer_token = torch.zeros_like(held.scored)
    one_answer_token[1, held.scored[1].nonzero()[5]] = True
    answer_changed = quality(_Perturbed(load_model(source, config), held, one_answer_token))
    assert answer_changed.kl_mean > 0.01 and answer_changed.ppl_ratio != 1


def test_messages_need_chat_turns_the_same_check_for_eval_as_for_calibration(write_recipe, tmp_path):
    from pipeline.run import make_plan

    notes = tmp_path / "notes.txt"
    notes.write_text("plain text, no turns")
    path = write_recipe(model="tiny:e2b", scheme="W4A16",
                        calibration={"sources": [{"source": str(notes), "format": "messages"}]},
                        eval={"source": str(notes), "format": "messages", "conversations": {"source": str(notes)}})
    with pytest.raises(RecipeError) as err:
        make_plan(load_recipe(path), path)
    why = (f"{shown(str(notes))}: format: messages needs chat turns, from a .jsonl or .parquet file, hf:<dataset id> or builtin "
           "(the built-in held-out conversations)")
    assert err.value.problems == [("calibration.sources.0.source", why), ("eval.source", why),
                                  ("eval.conversations.source", why)]
    with pytest.raises(RecipeError, match="eval.conversations.format: got 'text'; allowed: 'messages'"):
        load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", eval={"conversations": {"format": "text"}}))
    with pytest.raises(RecipeError, match="eval: a drafter is scored fed its target's states"):
        load_recipe(write_recipe(model="tiny:e2b-assistant", target="tiny:e2b", scheme="W8A16",
                                 eval={"conversations": "builtin"}))


def test_the_it_recipes_score_conversations_and_base_models_plain_text_only():
    from pipeline.recipe import RECIPES_DIR

    for path in RECIPES_DIR.glob("*.yaml"):
        recipe = load_recipe(path)
        instruct = recipe.model.id.startswith("google/") and "-it" in recipe.model.id
        assert (recipe.eval.conversations == ConversationsSpec()) == (instruct and recipe.target is None), path.name
        assert recipe.eval.format == "text", path.name  # the gates keep applying to plain text
    assert load_recipe("gemma3-270m-w4a16").eval.conversations is None  # Gemma 3 270M: a base model
    # a setting changes a key of `conversations: builtin` as of the mapping it stands for
    fewer = load_recipe("e2b-w4a16", (Setting.parse("eval.conversations.samples=4"),)).eval.conversations
    assert fewer == ConversationsSpec(samples=4)


@pytest.mark.slow
def test_a_tiny_instruct_build_shows_text_and_conversation_figures(tmp_path, capsys):
    """eval.json, the manifest, eval.md, the command's table and the card: the conversation figures beside the
    plain-text ones, each labelled."""
    from huggingface_hub import ModelCard

    from pipeline.cli import show_eval
    from pipeline.run import quantize_run

    recipe = tmp_path / "tiny-it.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\noutput_dir: {tmp_path / 'run'}\n"
                      "eval: {samples: 2, seq_len: 64, max_new_tokens: 4, conversations: {samples: 2, seq_len: 64}}\n")
    quantize_run(recipe)
    run = tmp_path / "run"
    report = json.loads((run / "eval.json").read_text())
    text, conversations = report["quality"], report["conversations"]["quality"]
    served, floor = report["conversations"]["served"], report["conversations"]["bf16_floor"]
    assert report["passed"] and text["tokens"] == 2 * 64 and 0 < conversations["tokens"] < 2 * 64
    assert 0 < conversations["kl_mean"] != text["kl_mean"] and served["dtype"] == "bfloat16" and floor["kl_mean"] > 0
    assert json.loads((run / "manifest.json").read_text())["validation"]["conversations"] == conversations
    md = (run / "eval.md").read_text()
    assert (f"Held-out conversations: builtin, 2 conversations in the chat template, each cut at 64 tokens, scored on "
            f"the assistant turns only ({conversations['tokens']:,} tokens).") in md
    assert f"| KL mean (unquantized ‖ quantized) | {conversations['kl_mean']:.5f} | {served['kl_mean']:.5f} |" in md
    card = ModelCard.load(run / "export" / "README.md").text
    plain, chat = card.split("**Conversations**")
    assert f"| KL divergence, mean (unquantized ‖ quantized, nats per token) | {text['kl_mean']:.5f} |" in plain
    assert ("the same figures on gemma-quant's built-in held-out conversations" in chat
            and f"2 conversations in the model's chat template, each cut at 64 tokens, scored on the assistant turns "
            f"only ({conversations['tokens']:,} tokens scored)" in chat)
    assert (f"| KL divergence, mean (unquantized ‖ quantized, nats per token) | {conversations['kl_mean']:.5f} | "
            f"{served['kl_mean']:.5f} | {floor['kl_mean']:.5f} |") in chat
    assert f"{text['tokens']:,} tokens of held-out text and {conversations['tokens']:,} assistant tokens of " \
           "held-out conversations only" in card
    capsys.readouterr()
    show_eval(run)  # the command's table: a column for each set
    assert f"conversations ({conversations['tokens']:,} assistant tokens)" in capsys.readouterr().out
