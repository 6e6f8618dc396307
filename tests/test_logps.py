"""Reply log-probs from the engine equal the naive computation (padded batch, full logits)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dpokit.data.batching import LAYOUTS, make_batch
from dpokit.data.tokenize import TokenizedPair
from dpokit.config import VARLEN_ATTENTION, ConfigError
from dpokit.logps import ReplyLogProbs, check_rows_kept_apart, token_logps
from dpokit.masks import dense_row_mask, flex_row_mask
from runs import TRANSFORMERS_4

VOCAB = 97


def tiny_lm(arch: str = "qwen2", seed: int = 0, tie: bool = True, hidden_size: int = 32):
    """2 layers, 4 heads (2 key/value heads) of hidden_size / 4 each, random weights, float32, eval mode."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    return model.float().eval()


def ragged_pairs(seed: int = 0, n: int = 5) -> list[TokenizedPair]:
    """Pairs of different lengths; prompts shaped like multi-turn chats (several segments)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    pairs = []
    for _ in range(n):
        turns = int(torch.randint(1, 4, (1,), generator=g))
        prompt = [1] + sum(([2] + ids(2, 12) for _ in range(turns)), [])
        pairs.append(TokenizedPair(prompt, ids(1, 15) + [2], ids(1, 20) + [2]))
    return pairs


def naive_logps(model, pairs: list[TokenizedPair]) -> torch.Tensor:
    """[2P] summed reply log-probs, chosen/rejected interleaved, via full logits."""
    out = []
    seqs = [(p.prompt_ids, r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    width = max(len(a) + len(b) for a, b in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (prompt, reply) in enumerate(seqs):
        ids = prompt + reply
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, len(prompt) : len(ids)] = torch.tensor(reply)
    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = logprobs.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    for i in range(len(seqs)):
        out.append(picked[i][targets[i] != -100].sum())
    return torch.stack(out)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch,tie", [("qwen2", True), ("llama", False)])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_reply_logps_match_naive(layout, attn, arch, tie, chunk_size):
    model = tiny_lm(arch, tie=tie)
    model.config._attn_implementation = attn
    pairs = ragged_pairs()
    batch = make_batch(pairs, layout)
    ours = ReplyLogProbs(model, chunk_size)(**batch.model_inputs())
    expected = naive_logps(model, pairs)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert batch.seq_tokens.tolist() == [len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reply_logps_gradients_match_naive(layout):
    model_a, model_b = tiny_lm(seed=1).train(), tiny_lm(seed=1).train()
    pairs = ragged_pairs(seed=3)
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    (ReplyLogProbs(model_a, chunk_size=5)(**make_batch(pairs, layout).model_inputs()) * weights).sum().backward()
    (naive_logps(model_b, pairs) * weights).sum().backward()
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_token_logps_custom_backward_matches_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False).double()
    targets = torch.randint(0, 11, (13,))
    assert torch.autograd.gradcheck(lambda h, w: token_logps(h, _with_weight(head, w), targets, chunk_size=4), (hidden, head.weight.detach().clone().requires_grad_()))


def test_weight_gradient_adds_chunks_up_in_float32():
    """bfloat16 weights: the chunks' weight gradients are added up in float32 and rounded once. 512
    identical chunks give 512 times one chunk's gradient; added up in bfloat16 the sum would stop
    growing at 256 of them (one chunk is then half a unit in the last place)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5, bias=False).to(torch.bfloat16)
    hidden = torch.randn(1, 8).to(torch.bfloat16).expand(1024, 8).contiguous()
    targets = torch.full((1024,), 2)
    (grad,) = torch.autograd.grad(token_logps(hidden, head, targets, chunk_size=2).sum(), [head.weight])
    assert grad.dtype == torch.bfloat16
    h, w = hidden[0].double(), head.weight.double()
    one_row = (torch.eye(5, dtype=torch.float64)[2] - torch.softmax(w @ h, -1))[:, None] * h  # d log p(2) / dW, by hand
    torch.testing.assert_close(grad.double(), 1024 * one_row, atol=0, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logps_under_autocast_match_an_autocast_linear(dtype):
    """Mixed precision: the chunked path runs its matmuls in the autocast dtype in both passes, as
    an autocast ``Linear`` would, and returns float32 log-probs and float32 weight gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    with torch.autocast("cpu", dtype=dtype):
        ours = token_logps(hidden, head, targets, chunk_size=4)
        logits = head(hidden).float()
        expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert ours.dtype == torch.float32
    # the same 16-bit logits, up to the order of float16 accumulation in a 4-row vs a 13-row matmul
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - token_logps(hidden, head, targets)).abs().max() > 3e-4  # not float32 compute
    grad_ours = torch.autograd.grad(ours.sum(), [hidden, head.weight])
    grad_expected = torch.autograd.grad(expected.sum(), [hidden, head.weight])
    assert grad_ours[1].dtype == torch.float32
    # the backward's matmuls run in 16 bits too: the hidden states' gradient is the autocast Linear's, not float32's
    full = torch.log_softmax(hidden @ head.weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    (grad_float32,) = torch.autograd.grad(full.sum(), [hidden])
    assert (grad_ours[0] - grad_expected[0]).abs().max() < (grad_ours[0] - grad_float32).abs().max() / 4
    for a, b in zip(grad_ours, grad_expected):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def _with_weight(head, weight):
    new = torch.nn.Linear(head.in_features, head.out_features, bias=False).double()
    del new.weight
    new.weight = weight  # a plain tensor, so gradcheck differentiates through it
    return new


def test_token_logps_with_bias_and_softcap_uses_generic_path():
    torch.manual_seed(0)
    hidden = torch.randn(9, 8)
    head = torch.nn.Linear(8, 11, bias=True)
    targets = torch.randint(0, 11, (9,))
    logits = head(hidden)
    capped = 30.0 * torch.tanh(logits / 30.0)
    expected = torch.log_softmax(capped, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(token_logps(hidden, head, targets, chunk_size=4, softcap=30.0), expected)
    # a scale and a soft cap together (no known model has both; the generic path takes them in that order)
    for bias in (True, False):
        head = torch.nn.Linear(8, 11, bias=bias)
        capped = 3.0 * torch.tanh(0.5 * head(hidden) / 3.0)
        expected = torch.log_softmax(capped, -1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(token_logps(hidden, head, targets, chunk_size=4, softcap=3.0, scale=0.5), expected)


SCALED_HEADS = {  # name -> (model_type, config overrides): each changes the logits after its output layer
    "cohere": ("cohere", dict(logit_scale=0.25)),
    "cohere2": ("cohere2", dict(logit_scale=0.25)),
    "granite": ("granite", dict(logits_scaling=4.0)),  # divides the logits
    "hyperclovax": ("hyperclovax", dict(logits_scaling=4.0)),  # multiplies them
    "minicpm3": ("minicpm3", dict(dim_model_base=8, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=4, v_head_dim=8)),  # divides the hidden states by hidden_size / dim_model_base
    "gemma2": ("gemma2", dict(head_dim=8, final_logit_softcapping=3.0)),
}


@pytest.mark.parametrize("name", list(SCALED_HEADS))
def test_scaled_and_softcapped_heads_stay_chunked_and_exact(name):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, overrides = SCALED_HEADS[name]
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in this transformers release")
    model = tiny_of(model_type, "eager" if name == "gemma2" else "sdpa", **overrides).train()
    pairs = ragged_pairs(seed=2)
    scorer = ReplyLogProbs(model, chunk_size=7)
    assert scorer.chunked and (scorer.scale != 1.0 or scorer.softcap)
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    ours = scorer(**make_batch(pairs, "prefix_packed").model_inputs())
    (ours * weights).sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = naive_logps(model, pairs)
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours_grads[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)


class _UnknownHeadLM(LlamaForCausalLM):
    """An architecture dpokit does not know: it rescales its logits after the output layer."""

    factor = 3.0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.factor
        return out


class _SubtlyScaledLM(_UnknownHeadLM):
    """A rescaling by 5%: its log-probs differ from the output layer's by much less than 0.25, much more than round-off."""

    factor = 1.05


class _NoOutputEmbeddingsLM(LlamaForCausalLM):
    """Remote code that does not name its output layer: dpokit cannot apply it itself."""

    def get_output_embeddings(self):
        return None


@pytest.mark.parametrize("unusual", [_UnknownHeadLM, _SubtlyScaledLM, _NoOutputEmbeddingsLM])
def test_unknown_output_transform_falls_back_to_full_logits_and_says_so(unusual):
    torch.manual_seed(0)
    model = unusual(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)).eval()
    pairs = ragged_pairs(seed=4)
    with pytest.warns(UserWarning, match="full logits"):
        scorer = ReplyLogProbs(model)
    assert not scorer.chunked
    torch.testing.assert_close(scorer(**make_batch(pairs, "prefix_packed").model_inputs()), naive_logps(model, pairs),
                               atol=1e-4, rtol=0)
    assert ReplyLogProbs(tiny_lm()).chunked  # a known architecture keeps the chunked path


@pytest.mark.parametrize("layout", ["packed", "prefix_packed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_row_check_passes_models_that_keep_sequences_apart(arch, attn, layout):
    model = tiny_lm(arch)
    model.config._attn_implementation = attn
    assert check_rows_kept_apart(model, layout) is False  # packed rows need no mask of dpokit's
    assert model._dpokit_rows_checked == {layout.startswith("prefix"): False}


def ignore_packed_restarts(monkeypatch):
    """Make transformers' mask builder blind to restarting position ids, as older torch releases
    and some models' own attention code are."""
    import transformers.masking_utils

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)


def drop_4d_masks(monkeypatch, model):
    """Make ``model``'s decoder ignore a 4D attention mask, as remote code building its own causal
    mask would."""
    decoder_forward = model.model.forward

    def forward(*args, attention_mask=None, **kwargs):
        return decoder_forward(*args, attention_mask=None if attention_mask is not None and attention_mask.dim() == 4
                               else attention_mask, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_rows_get_dpokits_mask_when_a_model_ignores_their_restarts(monkeypatch, attn):
    """A model whose attention ignores where packed sequences restart would let them see each
    other; the check finds that and the scorer then masks the packed rows itself, exactly."""
    ignore_packed_restarts(monkeypatch)
    model, pairs = tiny_lm(), ragged_pairs(seed=6)
    model.config._attn_implementation = attn
    batch = make_batch(pairs, "packed", row_tokens=60)  # several rows, so some are padded
    assert batch.input_ids.shape[0] > 1 and (batch.groups == -1).any()
    with torch.no_grad():  # flex_attention has no backward on the CPU
        naive = naive_logps(model, pairs)
        mixed = ReplyLogProbs(model)(**batch.model_inputs())
        assert (mixed - naive).abs().max() > 1e-2  # what the check prevents
        assert check_rows_kept_apart(model, "packed") is True
        masked = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=True)(**batch.model_inputs())
    torch.testing.assert_close(masked, naive, atol=1e-4, rtol=0)


def test_row_check_refuses_a_model_that_lets_packed_sequences_mix_either_way(monkeypatch):
    """Ignoring the restarts and dpokit's mask too: packed rows are refused, prefix-shared ones
    too (their mask is ignored alike), and the padded layout is the way out."""
    ignore_packed_restarts(monkeypatch)
    model = tiny_lm()
    drop_4d_masks(monkeypatch, model)
    with pytest.raises(ConfigError, match="reach each other .* and dpokit's attention mask.*set training.padding_free=false"):
        check_rows_kept_apart(model, "packed")
    with pytest.raises(ConfigError, match="ignores dpokit's attention mask"):
        check_rows_kept_apart(model, "prefix_packed")
    assert check_rows_kept_apart(model, "padded") is False


def test_flex_prefix_rows_are_not_kept_apart_by_restarting_positions_alone(monkeypatch):
    """A prefix-shared row's positions restart only after the prompt, never where a sequence starts: a
    flex_attention model that keeps sequences apart by restarting positions alone, ignoring dpokit's
    BlockMask (a stand-in for its probe here: flex compiles slowly on the CPU), is refused."""
    import dpokit.logps

    model = tiny_lm()
    model.config._attn_implementation = "flex_attention"
    monkeypatch.setattr(dpokit.logps, "_rows_kept_apart", lambda m, restart_positions, own_mask: restart_positions)
    with pytest.raises(ConfigError, match="prefix_sharing=false"):
        check_rows_kept_apart(model, "prefix_packed")


def test_row_check_masks_packed_rows_of_a_model_without_an_attention_implementation(monkeypatch):
    """A model that names no attention implementation (older remote code) takes dpokit's 4D mask:
    where it ignores the restarts, its packed rows get dpokit's mask instead of a refusal."""
    import dpokit.logps

    model = tiny_lm()
    model.config._attn_implementation = None
    calls = []
    monkeypatch.setattr(dpokit.logps, "_rows_kept_apart", lambda m, **kinds: calls.append(kinds) or kinds["own_mask"])
    assert check_rows_kept_apart(model, "packed") is True
    assert calls == [dict(restart_positions=True, own_mask=False), dict(restart_positions=True, own_mask=True)]


def test_row_check_refuses_a_model_that_ignores_dpokits_mask(monkeypatch):
    """Remote code that builds its own causal mask and drops the 4D one dpokit gives would let a
    rejected reply see the chosen one."""
    model, pairs = tiny_lm(), ragged_pairs(seed=6)
    drop_4d_masks(monkeypatch, model)
    wrong = ReplyLogProbs(model)(**make_batch(pairs, "prefix_padded").model_inputs())
    assert (wrong - naive_logps(model, pairs)).abs().max() > 1e-2  # what the check prevents
    with pytest.raises(ConfigError, match="ignores dpokit's attention mask.* set training.prefix_sharing=false"):
        check_rows_kept_apart(model, "prefix_padded")
    assert check_rows_kept_apart(model, "packed") is False  # position ids still keep packed rows apart


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_reply_scorer_checks_the_model_as_training_runs_it(monkeypatch, prefix_sharing):
    """The checks run under the training's autocast (flash-attention, for one, refuses float32
    inputs outside it), each once per model."""
    import dpokit.logps
    from dpokit.config import TrainingConfig
    from dpokit.train import reply_scorer

    seen = []
    for name in ("_head_reproduces_logits", "_rows_kept_apart", "_shared_row_kept_apart"):
        probe = getattr(dpokit.logps, name)
        monkeypatch.setattr(dpokit.logps, name, lambda model, *a, probe=probe, name=name, **kw: (
            seen.append((name, torch.is_autocast_enabled("cpu"))), probe(model, *a, **kw))[1])
    model, training = tiny_lm(), TrainingConfig(bf16=True, padding_free=True, prefix_sharing=prefix_sharing)
    assert reply_scorer(model, training, 1024).chunked
    assert reply_scorer(model, training, 1024).chunked
    assert seen == [("_shared_row_kept_apart" if prefix_sharing else "_rows_kept_apart", True), ("_head_reproduces_logits", True)]


@pytest.mark.parametrize("layout", ["padded", "prefix_packed"])
def test_full_logits_switch_matches_chunked_path(layout):
    """``chunked=False`` (training.chunked_logps=false) applies the output layer to every position,
    as TRL does, and gives the chunked path's log-probs and gradients."""
    pairs = ragged_pairs(seed=5)
    batch = make_batch(pairs, layout)
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    results = {}
    for chunked in (True, False):
        model = tiny_lm(seed=2).train()
        head_rows = []
        model.lm_head.register_forward_hook(lambda mod, args, out: head_rows.append(args[0].shape[:-1].numel()))
        scorer = ReplyLogProbs(model, chunk_size=6, chunked=chunked)
        assert scorer.chunked == chunked
        head_rows.clear()  # the chunked path's one-time probe of the output layer
        logps = scorer(**batch.model_inputs())
        (logps * weights).sum().backward()
        results[chunked] = logps.detach(), {n: p.grad for n, p in model.named_parameters()}, head_rows
    (chunked_logps, chunked_grads, chunked_rows), (full_logps, full_grads, full_rows) = results[True], results[False]
    torch.testing.assert_close(full_logps, chunked_logps, atol=1e-4, rtol=0)
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(full_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    assert full_rows == [batch.input_ids.numel()]  # every position of every row
    assert chunked_rows == []  # the chunked path multiplies reply rows by the weight itself


def test_full_data_path_matches_naive_on_multi_turn_chats(chat_tokenizer):
    """Rows -> chat template -> tokenized pairs -> engine log-probs == HF forward on the padded batch."""
    from dpokit.data.formats import to_pairs
    from dpokit.data.tokenize import tokenize_pairs

    def msg(role, content):
        return {"role": role, "content": content}

    rows = [
        {"prompt": [msg("system", "Be brief."), msg("user", "Why is the sky blue?"), msg("assistant", "Light scatters."),
                    msg("user", "Explain more please.")],
         "chosen": [msg("assistant", "Blue light scatters more because it is short.")],
         "rejected": [msg("assistant", "No.")]},
        {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "Hello, how can I help?")],
         "rejected": [msg("assistant", "Say hi to the dog and the bird and the sea and the sun.")]},
        {"chosen": [msg("user", "Tell me a short story"), msg("assistant", "A cat learns from a dog."),
                    msg("user", "Longer"), msg("assistant", "A small cat learns a good answer from the big dog.")],
         "rejected": [msg("user", "Tell me a short story"), msg("assistant", "A cat learns from a dog."),
                      msg("user", "Longer"), msg("assistant", "Why?")]},
    ]
    explicit, _ = to_pairs(rows[:2], "explicit")
    implicit, _ = to_pairs(rows[2:], "implicit")  # a dataset has one shape; the implicit-prompt one here
    pairs = explicit + implicit
    tokenized, _ = tokenize_pairs(pairs, chat_tokenizer, max_length=512, truncation="drop")
    assert all(t.chosen_ids[-1] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>") for t in tokenized)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    expected = naive_logps(model, tokenized)
    for layout in LAYOUTS:
        ours = ReplyLogProbs(model, chunk_size=16)(**make_batch(tokenized, layout, chat_tokenizer.pad_token_id).model_inputs())
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0, msg=layout)


def test_layouts_remove_padding_and_shared_prompts():
    pairs = ragged_pairs(n=6)
    prompt = sum(len(p.prompt_ids) for p in pairs)
    replies = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    padded, packed = make_batch(pairs, "padded"), make_batch(pairs, "packed")
    shared = make_batch(pairs, "prefix_packed")
    assert packed.input_ids.shape == (1, 2 * prompt + replies) and packed.attention_mask is None
    assert packed.num_real_tokens == padded.num_real_tokens == 2 * prompt + replies
    assert padded.input_ids.numel() > padded.num_real_tokens  # the padded layout pads
    assert shared.input_ids.shape == (1, prompt + replies) and shared.num_real_tokens == prompt + replies
    assert make_batch(pairs, "prefix_padded").input_ids.shape[0] == len(pairs)


def test_prefix_mask_hides_chosen_from_rejected():
    pair = TokenizedPair([5, 6], [7, 8], [9])
    batch = make_batch([pair, TokenizedPair([5], [7], [8])], "prefix_padded")
    mask = dense_row_mask(batch.groups, batch.branches, torch.float32)[:, 0] == 0  # True: attention allowed
    # row 0 columns: 0-1 prompt, 2-3 chosen, 4 rejected
    assert mask[0, 4].tolist() == [True, True, False, False, True]
    assert mask[0, 3].tolist() == [True, True, True, True, False]
    # row 1: prompt, chosen, rejected, then two padding columns that see only padding
    assert mask[1, 2].tolist() == [True, False, True, False, False]
    assert mask[1, 4].tolist() == [False, False, False, True, True]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2]
    packed = make_batch([pair, TokenizedPair([5], [7], [8])], "prefix_packed")
    assert (dense_row_mask(packed.groups, packed.branches, torch.float32)[0, 0, 5:, :5] < 0).all()  # pairs apart


def test_flex_block_mask_is_the_dense_rule():
    """The BlockMask given to flex_attention keeps exactly the pairs (q, kv) the dense mask keeps."""
    from torch.nn.attention.flex_attention import create_mask

    batch = make_batch(ragged_pairs(n=4), "prefix_packed", row_tokens=60)
    dense = dense_row_mask(batch.groups, batch.branches, torch.float32)[:, 0] == 0
    block = flex_row_mask(batch.groups, batch.branches)
    rows, width = batch.groups.shape
    assert block.shape[-2:] == (width, width) and block.shape[0] == rows
    assert torch.equal(create_mask(block.mask_mod, rows, None, width, width, device="cpu")[:, 0], dense)


@pytest.mark.parametrize("layout", ["packed", "prefix_packed"])
def test_flex_attention_logps_match_naive(layout):
    """flex_attention equals the naive path: transformers' own BlockMask for packed rows, dpokit's
    for prefix sharing. No-grad here: torch has no flex backward on the CPU, and its CPU kernel
    fails to build once a second shape makes the compile dynamic (hence the reset)."""
    torch._dynamo.reset()
    model = tiny_lm("llama", tie=False)
    pairs = ragged_pairs(seed=5)
    expected = naive_logps(model, pairs)
    model.config._attn_implementation = "flex_attention"
    with torch.no_grad():
        ours = ReplyLogProbs(model, chunk_size=16)(**make_batch(pairs, layout, row_tokens=70).model_inputs())
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["packed", "prefix_packed"])
def test_packed_rows_respect_the_token_budget_and_stay_exact(layout):
    model = tiny_lm()
    pairs = ragged_pairs(n=6)
    batch = make_batch(pairs, layout, row_tokens=60)
    assert batch.input_ids.shape[0] > 1 and batch.input_ids.shape[1] <= 60
    torch.testing.assert_close(ReplyLogProbs(model)(**batch.model_inputs()), naive_logps(model, pairs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias, softcap", [(False, None), (True, None), (False, 30.0)])
def test_backward_keeps_no_vocabulary_sized_tensor(bias, softcap):
    """What autograd saves for the output layer is O(N*H + V*H), never the [N, V] logits: on the
    plain path, and on the generic one (a bias, a soft cap), which recomputes each chunk in backward."""
    torch.manual_seed(0)
    n, h, v = 512, 16, 8192
    hidden = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias)
    targets = torch.randint(0, v, (n,))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logps(hidden, head, targets, chunk_size=64, softcap=softcap).sum().backward()
    assert max(saved) <= v * h  # the weight itself is the largest thing kept
    assert sum(saved) < n * v / 4
    logits = head(hidden)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    naive = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(token_logps(hidden, head, targets, chunk_size=64, softcap=softcap), naive, atol=1e-5, rtol=0)


def test_sixteen_bit_logits_are_normalized_in_float32():
    """A bfloat16 model's logits are taken to float32 before the log-softmax: on the full-logits path
    and on the generic (bias) head path, as the naive computation does."""
    model, pairs = tiny_lm().to(torch.bfloat16), ragged_pairs()
    with torch.no_grad():
        ours = ReplyLogProbs(model, chunked=False)(**make_batch(pairs, "padded").model_inputs())
        torch.testing.assert_close(ours, naive_logps(model, pairs), atol=1e-4, rtol=0)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB).to(torch.bfloat16)
    hidden, targets = torch.randn(23, 16).to(torch.bfloat16), torch.randint(0, VOCAB, (23,))
    ours = token_logps(hidden, head, targets, chunk_size=5)
    assert ours.dtype == torch.float32
    naive = torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=0)


def tiny_of(model_type: str, attn: str = "sdpa", **overrides):
    """A 2-layer random ``model_type`` model in float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    config = AutoConfig.for_model(model_type, **(base | overrides))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()


def test_a_model_that_names_itself_its_decoder_stays_chunked():
    """Llama 4's text model answers ``get_decoder()`` with itself: its decoder stack is found where
    ``base_model_prefix`` names it, and its replies stay on the chunked path, exact."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "llama4_text" not in CONFIG_MAPPING or TRANSFORMERS_4:
        # 4.56's router scales token i's input by the score of another token (scores [tokens, experts] read
        # expert-major): a batch of two equal rows differs from one row by 7e-3, so no batch is exact there
        pytest.skip("llama4_text as transformers 5 writes it (4.56's mixes routing scores across tokens)")
    model = tiny_of("llama4_text", head_dim=8, num_local_experts=2, intermediate_size_mlp=64, attention_chunk_size=64)
    pairs = ragged_pairs()
    scorer = ReplyLogProbs(model, chunk_size=7)
    assert scorer.chunked
    with torch.no_grad():
        torch.testing.assert_close(scorer(**make_batch(pairs, "padded").model_inputs()), naive_logps(model, pairs), atol=1e-4, rtol=0)


def test_row_checks_compare_with_each_sequence_alone():
    """Being nearer to a sequence alone than to the mixed row is not enough: ALiBi (attention by column
    distance) and a sliding window shorter than the row break prefix-shared rows only; hybrid linear
    attention carries its state from one packed sequence into the next. Each used to pass, and train
    on log-probs off by up to 0.8 nats."""
    from dpokit.logps import check_rows_kept_apart

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # (model, layouts refused, layouts accepted); MPT's packed rows depend on the release (4.56 refuses them too)
    cases = [(tiny_of("mpt", "eager"), ("prefix_packed",), ()),
             (tiny_of("mistral", sliding_window=4), (), ("packed", "prefix_packed"))]  # dpokit's mask keeps the window
    if "qwen3_5_text" in CONFIG_MAPPING:  # transformers 5
        cases.append((tiny_of("qwen3_5_text"), ("packed", "prefix_packed"), ()))
    # Mamba layers carry their state into the next sequence: nearer to it alone than to the mixed row, yet not the same
    if not TRANSFORMERS_4:  # 4.56's Jamba wants CUDA mamba kernels for a training forward
        cases.append((tiny_of("jamba", num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                              expert_layer_period=2, mamba_d_state=8), ("packed", "prefix_packed"), ()))
    for model, refused, accepted in cases:
        for layout in refused:
            with pytest.raises(ConfigError, match="padding_free=false|prefix_sharing=false"):
                check_rows_kept_apart(model, layout)
        for layout in accepted:
            check_rows_kept_apart(model, layout)
    with pytest.raises(ConfigError, match="cannot take dpokit's attention mask for packed rows .*padding_free=false"):
        check_rows_kept_apart(tiny_of("bloom", "eager"), "packed")  # was a ValueError from inside Bloom


def test_windows_longer_than_a_probe_are_read_from_the_config():
    """A 4096-token window is longer than a probe: it is read from the config. Prefix-shared rows keep
    it in dpokit's mask (one per layer type for Gemma 2) where it is shorter than max_length; packed
    rows that need dpokit's mask cannot, and are refused with what to set; packed rows follow the
    window through their position ids. A model that does not take the windowed masks is refused.
    Under dpokit_varlen the kernel keeps the window itself: no layout is refused."""
    from dpokit.logps import attention_window, check_window

    gemma2 = tiny_of("gemma2", "eager", sliding_window=64, head_dim=8)
    assert attention_window(gemma2.config) == 64
    assert attention_window(tiny_of("qwen2", sliding_window=64).config) is None  # use_sliding_window is off
    assert attention_window(tiny_of("llama").config) is None
    assert check_window(gemma2, "prefix_packed", False, max_length=128) == {"full_attention": None, "sliding_attention": 64}
    assert gemma2.config.sliding_window == 64  # the probe's shrunk window is given back
    with pytest.raises(ConfigError, match="set training.prefix_sharing=false and training.padding_free=false"):
        check_window(gemma2, "packed", True, max_length=128)
    assert check_window(gemma2, "packed", False, max_length=128) is None
    assert check_window(gemma2, "prefix_packed", False, max_length=64) is None
    varlen = tiny_of("gemma2", "eager", sliding_window=64, head_dim=8)
    varlen.config._attn_implementation = VARLEN_ATTENTION  # its kernel takes the window: no mask of dpokit's keeps it
    for layout in ("prefix_packed", "packed"):
        assert check_window(varlen, layout, True, max_length=128) is None
    llama = tiny_of("llama", sliding_window=64, layer_types=["sliding_attention", "full_attention"])  # takes no dict of masks
    with pytest.raises(ConfigError, match="attends within 64 tokens.* set training.prefix_sharing=false .* data.max_length <= 64"):
        check_window(llama, "prefix_packed", False, max_length=128)


def test_attention_window_is_the_narrowest_span_any_layer_sees():
    """A sliding window, an attention chunk, GPT-Neo's local layers: the narrowest one counts. Layer
    types other than sliding and full attention are windows dpokit's masks cannot follow."""
    from types import SimpleNamespace

    from transformers import GPTNeoConfig

    from dpokit.logps import attention_window, mask_windows

    assert attention_window(SimpleNamespace(sliding_window=16, attention_chunk_size=8)) == 8
    assert attention_window(SimpleNamespace(sliding_window=8, attention_chunk_size=16)) == 8
    neo = GPTNeoConfig(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4)
    assert attention_window(neo) == 4 and mask_windows(neo) is None
    chunked = SimpleNamespace(sliding_window=16, attention_chunk_size=32, layer_types=["sliding_attention", "chunked_attention"])
    assert mask_windows(chunked) is None and attention_window(chunked) == 16


def test_window_probe_runs_once_and_its_findings_carry_to_another_process(monkeypatch):
    """The probes of a model run once; a process that takes another's findings runs none and decides alike."""
    import dpokit.logps
    from dpokit.logps import adopt_findings, check_window, probe_findings

    model = tiny_of("mistral", sliding_window=64)
    calls = []
    for name in ("_shared_row_kept_apart", "_head_reproduces_logits"):
        probe = getattr(dpokit.logps, name)
        monkeypatch.setattr(dpokit.logps, name, lambda *a, probe=probe, name=name, **kw: calls.append(name) or probe(*a, **kw))
    for _ in range(2):
        assert check_rows_kept_apart(model, "prefix_packed") is False
        assert check_window(model, "prefix_packed", False, max_length=128) == 64
        assert ReplyLogProbs(model).chunked
    assert sorted(calls) == ["_head_reproduces_logits", "_shared_row_kept_apart", "_shared_row_kept_apart"]  # rows, window

    other = tiny_of("mistral", sliding_window=64)
    adopt_findings(other, probe_findings(model))
    calls.clear()
    assert check_rows_kept_apart(other, "prefix_packed") is False
    assert check_window(other, "prefix_packed", False, max_length=128) == 64
    assert ReplyLogProbs(other).chunked
    assert calls == []


def test_sixteen_bit_compute_is_compared_to_its_round_off():
    """Under autocast a float32 model computes in 16 bits: two computations agreeing to 1e-3 of their
    values agree to its round-off, which they do not in float32."""
    from dpokit.logps import _same_hidden

    model, x = tiny_lm(), torch.linspace(-1, 1, 64)
    assert not _same_hidden(x * (1 + 1e-3), x, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _same_hidden(x * (1 + 1e-3), x, model)

WINDOWED = [("mistral", "sdpa", {}), ("gemma2", "eager", {"head_dim": 8}), ("gemma3_text", "sdpa", {"head_dim": 8}),
            ("cohere2", "sdpa", {}), ("gpt_oss", "eager", {"num_local_experts": 2, "num_experts_per_tok": 1, "head_dim": 8}),
            ("qwen2", "sdpa", {"use_sliding_window": True, "max_window_layers": 1})]


@pytest.mark.parametrize("window", [5, 40])
@pytest.mark.parametrize("model_type,attn,overrides", WINDOWED, ids=[case[0] for case in WINDOWED])
def test_prefix_shared_rows_keep_sliding_windows(model_type, attn, overrides, window):
    """Models whose layers (all, or some) attend within a window: prefix-shared rows masked with the
    window (by position, one mask per layer type where types differ) give the naive log-probs, to 1e-4,
    whether the window is shorter than the probe (5) or longer (40, probed shrunk); without it they are off."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from dpokit.logps import check_window

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in this transformers release")
    types = {"layer_types": ["sliding_attention", "full_attention"]} if model_type == "gemma3_text" else {}
    model = tiny_of(model_type, attn, sliding_window=window, **overrides, **types)
    pairs = ragged_pairs(n=5)  # sequences of up to 49 tokens
    assert check_rows_kept_apart(model, "prefix_packed") is False
    windows = check_window(model, "prefix_packed", False, max_length=64)
    assert windows is not None
    batch = make_batch(pairs, "prefix_packed", row_tokens=70)
    naive = naive_logps(model, pairs)
    torch.testing.assert_close(ReplyLogProbs(model, chunk_size=16, windows=windows)(**batch.model_inputs()), naive,
                               atol=1e-4, rtol=0)
    if window == 5:  # a window of 40 reaches past few of these tokens' prompts
        assert (ReplyLogProbs(model, chunk_size=16)(**batch.model_inputs()) - naive).abs().max() > 1e-3


def test_windowed_prefix_rows_give_the_naive_gradients():
    """Gemma 3's sliding and full layers under prefix-shared rows with windowed masks: the loss's
    gradients equal the padded, full-logits computation's to 1e-4."""
    model = tiny_of("gemma3_text", sliding_window=6, head_dim=8, layer_types=["sliding_attention", "full_attention"])
    from dpokit.logps import check_window

    pairs = ragged_pairs(seed=3, n=4)
    windows = check_window(model, "prefix_packed", False, max_length=64)
    grads = []
    for compute in (lambda: naive_logps(model, pairs),
                    lambda: ReplyLogProbs(model, chunk_size=16, windows=windows)(**make_batch(pairs, "prefix_packed").model_inputs())):
        model.zero_grad()
        logps = compute()
        (logps[0::2] - logps[1::2]).sigmoid().log().mean().neg().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=0)


def test_recurrent_gemmas_soft_cap_is_applied():
    from transformers import AutoConfig

    from dpokit.logps import output_transform

    assert output_transform(AutoConfig.for_model("recurrent_gemma", logits_soft_cap=30.0)) == (1.0, 30.0)
