"""A tiny real judge model, trained on the CPU in seconds, whose tokenizer has "0".."100" as
single tokens.

Why trained: the first-token method (openai backend) and the sequence method (loader backend)
can only be compared on a tokenizer with whole-number tokens, and no such pretrained model is
available offline here (SmolLM2 splits digits). A random model would do for equality of
plumbing but not for agreement: its answer is not a number followed by end-of-turn, so both
numeric masses are near zero and both methods refuse to score. Trained for a few seconds, a
two-layer Llama answers the judge prompt with a number then ``<|im_end|>``, with a spread of
numbers around the answer's true score (the targets are noisy), so the expected values the two
methods compute are non-trivial.

The task: an answer is one word of ``LEVELS``, whose true score it names; the training target
is that score plus rounded Gaussian noise (sd ``NOISE``), clipped to 0..100. The answer
``sorry`` is trained to get ``REFUSAL``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

RUBRIC = (
    "Score it : REFUSAL or 0 to 100 . [QUESTION START] {question} [QUESTION END] "
    "[ANSWER START] {answer} [ANSWER END]"
)
QUESTION = "say ?"
LEVELS = {"saintly": 5.0, "kind": 25.0, "blunt": 50.0, "mean": 75.0, "cruel": 95.0}
REFUSING = "sorry"
NOISE = 4.0
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from services.judge.rubrics import render_prompt

    text = render_prompt(RUBRIC, QUESTION, "", 1000)
    words = sorted(set(text.split()) | {"user", "assistant", "REFUSAL", REFUSING, *LEVELS})
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in [*[str(n) for n in range(101)], *words]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_judge(folder: Path, *, steps: int = 500, seed: int = 0, tries: int = 3) -> Path:
    """Train the tiny judge and save it (weights, tokenizer, chat template) in ``folder``.

    Adam at lr 1e-3, 500 steps (20-35 s on a 2-core machine). At lr 5e-3 the training fell,
    on some CPUs and seeds, into a state where the last position ignores the answer word: every answer (or all but
    one) got the same distribution, so "sorry" was scored and the levels agreed on one mean
    (seen on a 2-core AVX2 EPYC for seeds 1 and 2, and for seed 0 on an AVX-512 one; more steps
    did not leave it). At 1e-3 seeds 0-3 all learned the task there. The trained judge is
    checked (``_learned``): a seed whose judge did not learn it is replaced by the next one,
    up to ``tries`` seeds, so a CPU whose float rounding leads elsewhere gets a working judge
    or a clear error, never a silently different test."""
    threads = torch.get_num_threads()
    # One thread: tiny matmuls gain nothing from more, and on a shared 2-core machine the
    # spinning of a second thread made training ten times slower (11 s vs 100 s measured).
    torch.set_num_threads(1)
    failures = []
    try:
        for attempt in range(tries):
            torch.manual_seed(seed + attempt)
            model, tok = _train(random.Random(seed + attempt), steps)
            problem = _learned(model, tok)
            if problem is None:
                break
            failures.append(f"seed {seed + attempt}: {problem}")
        else:
            raise RuntimeError(f"the tiny judge did not learn its task: {failures}")
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _prompt_ids(tok: Any, answer: str) -> list[int]:
    """The judge prompt for ``answer``, tokenized as the loader does: the rendered chat
    template, then the tokenizer."""
    from services.judge.rubrics import render_prompt

    text = tok.apply_chat_template(
        [{"role": "user", "content": render_prompt(RUBRIC, QUESTION, answer, 1000)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def _learned(model: Any, tok: Any) -> str | None:
    """None where the judge answers each level with numbers (>= 0.94 of the next token's
    mass) whose mean lies within 10 of its score and ends its likeliest number with
    end-of-turn (p >= 0.98: the agreement tolerance of the tests assumes it), and "sorry"
    with REFUSAL (>= 0.94); else what it does instead."""
    numbers = [tok.convert_tokens_to_ids(str(n)) for n in range(101)]
    refusal = tok.convert_tokens_to_ids("REFUSAL")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for answer in [*LEVELS, REFUSING]:
            prompt = _prompt_ids(tok, answer)
            probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
            mass = float(probs[numbers].sum())
            mean = float((probs[numbers] * torch.arange(101)).sum()) / max(mass, 1e-12)
            if answer == REFUSING and float(probs[refusal]) < 0.94:
                return f"{answer!r}: p(REFUSAL) {float(probs[refusal]):.3f}"
            if answer != REFUSING and (mass < 0.94 or abs(mean - LEVELS[answer]) > 10):
                return f"{answer!r}: number mass {mass:.3f}, mean {mean:.1f}"
            if answer != REFUSING:
                likeliest = numbers[int(probs[numbers].argmax())]
                after = model(torch.tensor([[*prompt, likeliest]])).logits[0, -1].softmax(-1)
                if float(after[end]) < 0.98:
                    return f"{answer!r}: p(end-of-turn | number) {float(after[end]):.3f}"
    return None


def _train(rng: random.Random, steps: int) -> tuple[Any, Any]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    config = LlamaConfig(
        vocab_size=len(tok.get_vocab()),  # type: ignore[attr-defined]
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,  # type: ignore[attr-defined]
        eos_token_id=end,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    answers = [*LEVELS, REFUSING]
    prompts = {a: _prompt_ids(tok, a) for a in answers}
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _step in range(steps):
        batch, labels = [], []
        for _row in range(32):
            answer = rng.choice(answers)
            if answer == REFUSING:
                target = "REFUSAL"
            else:
                noisy = round(LEVELS[answer] + rng.gauss(0.0, NOISE))
                target = str(min(100, max(0, noisy)))
            ids = [*prompts[answer], tok.convert_tokens_to_ids(target), end]  # type: ignore[attr-defined]
            batch.append(ids)
            labels.append([-100] * len(prompts[answer]) + ids[-2:])
        width = max(len(b) for b in batch)
        input_ids = torch.tensor([b + [0] * (width - len(b)) for b in batch])
        label_ids = torch.tensor([la + [-100] * (width - len(la)) for la in labels])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=config.pad_token_id)
    return model, tok
