"""Learned context + deep text prompts (zsadlib.prompts.learned) on the tiny random-weight backbone."""
import pytest
import torch
import torch.nn.functional as F

from zsadlib.prompts.learned import (
    ANOMALYCLIP_TEMPLATES,
    LearnedPromptConfig,
    LearnedPromptText,
    PromptError,
    fill_placeholder,
)


def _prompt(backbone, seed=0, **overrides):
    return LearnedPromptText(backbone, LearnedPromptConfig(**overrides), generator=torch.Generator().manual_seed(seed))


def _block_inputs(backbone, run):
    """Inputs of every text block during ``run()``: {1-based layer: [N, 77, W]}."""
    seen = {}
    handles = [
        block.register_forward_pre_hook(lambda module, args, index=index: seen.__setitem__(index, args[0].detach()))
        for index, block in enumerate(backbone.model.transformer.resblocks, start=1)
    ]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _plain_text_encoder(backbone, embeddings, token_ids, deep: dict[int, torch.Tensor]):
    """A from-scratch text encoder: positional embedding, blocks with deep tokens overwriting 1..n, EOT pooling."""
    model = backbone.model
    x = embeddings + model.positional_embedding
    for index, block in enumerate(model.transformer.resblocks, start=1):
        if index in deep:
            x = x.clone()
            x[:, 1:1 + deep[index].shape[0]] = deep[index]
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    eot = token_ids.argmax(dim=-1)
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def test_defaults_are_anomalyclip(tiny_backbone):
    text = _prompt(tiny_backbone)
    width = tiny_backbone.text_width
    assert text.prompt_texts == [" ".join(["X"] * 12) + " object.", " ".join(["X"] * 12) + " damaged object."]
    assert text.deep_layers == tuple(range(2, 10))
    assert dict((k, tuple(v.shape)) for k, v in text.named_parameters()) == {
        "context": (2, 12, width), "deep_prompts": (8, 4, width)}
    assert set(text.state_dict()) == {"context", "deep_prompts"}  # no CLIP weights, no buffers
    assert text.context_positions.tolist() == [list(range(1, 13))] * 2
    for parameter in (text.context, text.deep_prompts):
        assert 0.015 < float(parameter.detach().std()) < 0.025
    again = _prompt(tiny_backbone)
    assert torch.equal(text.context, again.context) and torch.equal(text.deep_prompts, again.deep_prompts)
    assert text.templates == ANOMALYCLIP_TEMPLATES


def test_shapes_and_context_shift(tiny_backbone):
    text = _prompt(tiny_backbone)
    width, dim = tiny_backbone.text_width, tiny_backbone.embed_dim
    with torch.no_grad():
        plain = text()
        assert plain.shape == (2, dim)
        zero = text(context_shift=torch.zeros(3, 1, width))
        assert zero.shape == (3, 2, dim)
        torch.testing.assert_close(zero, plain[None].expand(3, -1, -1), atol=1e-5, rtol=0)
        shift = torch.randn(3, 2, 12, width, generator=torch.Generator().manual_seed(1)) * 0.05
        batched = text(context_shift=shift)
        for b in range(3):
            single = text(context_shift=shift[b:b + 1])[0]
            torch.testing.assert_close(batched[b], single, atol=1e-5, rtol=0)
        # a shift shared by the prompts [B, n_ctx, W] is the per-prompt shift repeated
        shared = torch.randn(2, 12, width, generator=torch.Generator().manual_seed(2)) * 0.05
        torch.testing.assert_close(text(context_shift=shared),
                                   text(context_shift=shared[:, None].expand(-1, 2, -1, -1)), atol=1e-6, rtol=0)
        assert not torch.allclose(batched[0], plain, atol=1e-4)
    with pytest.raises(PromptError, match="context_shift"):
        text(context_shift=torch.zeros(3, 5, width))


def test_one_encoder_call_for_all_prompts_and_samples(tiny_backbone):
    text = _prompt(tiny_backbone)
    calls = []
    handle = tiny_backbone.model.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            text(context_shift=torch.zeros(4, 1, tiny_backbone.text_width))
    finally:
        handle.remove()
    assert calls == [4 * 2]


@pytest.mark.parametrize("template", ["{} object.", "a close {} view of the object"])
def test_real_word_context_reproduces_encode_text(tiny_backbone, template):
    """Context set to the token embeddings of real words == CLIP's own encoding of the plain text."""
    words = "a photo of a"
    text = _prompt(tiny_backbone, templates=(template,), n_ctx=4, deep_layers=())
    ids = tiny_backbone.tokenize([words])[0, 1:5]
    with torch.no_grad():
        text.context[0] = tiny_backbone.model.token_embedding(ids)
        expected = tiny_backbone.encode_text([template.format(words)])
        torch.testing.assert_close(text(), expected, atol=1e-5, rtol=0)


def test_deep_prompts_replace_not_append(tiny_backbone):
    text = _prompt(tiny_backbone, deep_prompt_fp16_round=False)
    pos = tiny_backbone.model.positional_embedding
    with torch.no_grad():
        seen, _ = _block_inputs(tiny_backbone, text)
    assert sorted(seen) == list(range(1, 13))
    length = int(text.token_ids.argmax(dim=-1).max()) + 1  # the sequence runs up to the last end-of-text token
    assert text.encoded_length(text.token_ids) == length == 17
    for layer, x in seen.items():
        assert x.shape == (2, length, tiny_backbone.text_width)
    # block 1: the learned context (plus the positional embedding) at positions 1..12
    torch.testing.assert_close(seen[1][:, 1:13] - pos[1:13], text.context.detach(), atol=1e-6, rtol=0)
    for layer in range(2, 10):
        for prompt in range(2):
            assert torch.equal(seen[layer][prompt, 1:5], text.deep_prompts[layer - 2].detach())
    for layer in (10, 11, 12):  # no deep prompt there: the tokens are the previous block's outputs
        assert not torch.allclose(seen[layer][0, 1:5], text.deep_prompts[-1].detach())


def test_matches_plain_encoder_with_deep_prompts(tiny_backbone):
    for fp16 in (True, False):
        text = _prompt(tiny_backbone, seed=3, deep_prompt_fp16_round=fp16)
        with torch.no_grad():
            embeddings = tiny_backbone.model.token_embedding(text.token_ids).clone()
            embeddings[:, 1:13] = text.context
            deep = {layer: (text.deep_prompts[layer - 2].half().float() if fp16 else text.deep_prompts[layer - 2])
                    for layer in range(2, 10)}
            expected = _plain_text_encoder(tiny_backbone, embeddings, text.token_ids, deep)
            torch.testing.assert_close(text(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fp16", [True, False])
def test_cut_sequence_equals_full_length_values_and_gradients(tiny_backbone, fp16):
    """Running only up to the last end-of-text token (causal attention) equals the full 77-token encoding, for the
    values and the gradients of the context, the deep prompts and a per-sample shift."""
    text = _prompt(tiny_backbone, seed=5, deep_prompt_fp16_round=fp16)
    shift = (0.1 * torch.randn(3, 1, tiny_backbone.text_width, generator=torch.Generator().manual_seed(1)))
    outputs, grads = [], []
    for full in (False, True):
        text.zero_grad()
        step_shift = shift.clone().requires_grad_(True)
        embeddings = text.prompt_embeddings(step_shift).reshape(6, 77, -1)
        ids = text.token_ids[None].expand(3, -1, -1).reshape(6, 77)
        out = text.encode(embeddings, ids, full_length=full)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outputs.append(out.detach())
        grads.append([text.context.grad.clone(), text.deep_prompts.grad.clone(), step_shift.grad.clone()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=2e-6)  # float32 summation order only
    # with fp16 rounding the deep-prompt gradients are rounded to float16 per prompt copy, so float noise of 1e-7
    # can flip one float16 rounding: one float16 ulp (relative 2**-10) is the honest bound there
    # (in float64 the two agree to 1e-15 relative; float32 gradient sums of ~30 differ by ~1e-5 in the order)
    rtol = 2.0 ** -10 if fp16 else 0.0
    for cut, full in zip(*grads):
        scale = float(full.abs().max())
        assert scale > 0
        torch.testing.assert_close(cut, full, atol=2e-6 * scale, rtol=rtol)


def test_fp16_rounding_switch(tiny_backbone):
    on = _prompt(tiny_backbone, seed=4, deep_prompt_fp16_round=True)
    off = _prompt(tiny_backbone, seed=4, deep_prompt_fp16_round=False)
    raw = on.deep_prompts[0].detach()
    assert torch.equal(on.deep_prompt(2), raw.half().float())
    assert torch.equal(off.deep_prompt(2), raw)  # off: the exact float32 values
    assert not torch.equal(on.deep_prompt(2), raw)
    with torch.no_grad():
        a, b = on(), off()
    assert 0 < float((a - b).abs().max()) < 1e-2  # rounding moves the embeddings, slightly
    # the cast is differentiable: the gradient reaches the float32 parameters
    on.zero_grad()
    on().pow(2).sum().backward()
    assert on.deep_prompts.grad is not None and float(on.deep_prompts.grad.abs().sum()) > 0
    assert on.deep_prompts.grad.dtype == torch.float32


def test_training_step_changes_only_prompts(tiny_backbone):
    text = _prompt(tiny_backbone, seed=5)
    frozen = {name: p.detach().clone() for name, p in tiny_backbone.named_parameters()}
    before = {name: p.detach().clone() for name, p in text.named_parameters()}
    optimizer = torch.optim.Adam(text.parameters(), lr=1e-3, betas=(0.5, 0.999))
    features = F.normalize(text(), dim=-1)
    loss = (features[0] @ features[1])  # push the two prompts apart
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, parameter in text.named_parameters():
        assert not torch.equal(parameter, before[name]), name
    for name, parameter in tiny_backbone.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
        assert torch.equal(parameter, frozen[name]), name


def test_errors(tiny_backbone):
    with pytest.raises(PromptError, match="exactly one"):
        fill_placeholder("no placeholder", 3)
    with pytest.raises(PromptError, match="out of range"):
        _prompt(tiny_backbone, deep_layers=(13,))
    with pytest.raises(PromptError, match="context tokens"):
        _prompt(tiny_backbone, n_ctx=80)
    with pytest.raises(PromptError, match="no deep prompt"):
        _prompt(tiny_backbone).deep_prompt(1)
    text = _prompt(tiny_backbone, deep_layers=())
    assert text.deep_prompts is None and set(text.state_dict()) == {"context"}
