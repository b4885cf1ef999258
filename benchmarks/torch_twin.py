"""A plain PyTorch eager twin of Phase1Decoder and its train step, for benchmarks/vs_pytorch.py.

Written the way a PyTorch user would (nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention,
torch.optim.AdamW with its defaults), with the same parameters (count and shapes, up to PyTorch's
[out, in] Linear layout), the same matmuls and the same loss terms as phase1_jax:

  features -> Linear -> LayerNorm = memory; tokens -> embedding + position embedding;
  num_layers applications of num_unique_layers pre-LN layers (application i uses layer i % U):
    x + SelfAttn(LN x) [causal and key padding], + CrossAttn(LN x, memory) [patch mask], + MLP
    (tanh-approximate GELU, as jax.nn.gelu);
  final LayerNorm; detail logits tied to the token embedding; semantic Linear; element classifier
  by masked attention pooling; loss 0.4 detail CE + 0.3 semantic CE + 0.2 element BCE + 0.1
  consistency (max over valid positions of p(open tag of e), squared against sigmoid(element)).
  Optimizer: global-norm clip 1.0, AdamW (weight decay on matrices only), warmup-cosine schedule.

PyTorch is in no extra of the package (the `bench` extra is matplotlib only): it needs
`pip install torch` (the CPU wheel: `pip install torch --index-url
https://download.pytorch.org/whl/cpu`) in addition. Nothing in the package or the tests imports
this file.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
  def __init__(self, d, heads, cross):
    super().__init__()
    self.heads, self.cross = heads, cross
    if cross:
      self.q, self.kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
    else:
      self.qkv = nn.Linear(d, 3 * d)
    self.out = nn.Linear(d, d)

  def forward(self, x, memory, mask_Bx1xTxS):
    b, t, d = x.shape
    if self.cross:
      q = self.q(x)
      k, v = self.kv(memory).chunk(2, dim=-1)
    else:
      q, k, v = self.qkv(x).chunk(3, dim=-1)
    heads = lambda y: y.reshape(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask_Bx1xTxS)
    return self.out(out.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
  def __init__(self, d, heads, mlp):
    super().__init__()
    self.self_norm, self.cross_norm, self.mlp_norm = (nn.LayerNorm(d) for _ in range(3))
    self.self_attn, self.cross_attn = Attention(d, heads, False), Attention(d, heads, True)
    self.mlp_in, self.mlp_out = nn.Linear(d, mlp), nn.Linear(mlp, d)

  def forward(self, x, self_mask, memory, cross_mask):
    x = x + self.self_attn(self.self_norm(x), None, self_mask)
    x = x + self.cross_attn(self.cross_norm(x), memory, cross_mask)
    return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate='tanh'))


class Twin(nn.Module):
  def __init__(self, *, vocab_size, num_semantic_classes, num_element_types, feature_dim,
               max_seq_len, d_model, num_heads, num_layers, num_unique_layers, mlp_dim):
    super().__init__()
    self.num_layers = num_layers
    self.token_embed = nn.Embedding(vocab_size, d_model)
    self.position_embed = nn.Embedding(max_seq_len, d_model)
    self.feature_proj = nn.Linear(feature_dim, d_model)
    self.memory_norm, self.final_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
    self.layers = nn.ModuleList([Layer(d_model, num_heads, mlp_dim)
                                 for _ in range(num_unique_layers)])
    self.semantic = nn.Linear(d_model, num_semantic_classes)
    std = d_model ** -0.5
    self.queries = nn.Parameter(torch.randn(num_element_types, d_model) * std)
    self.readout = nn.Parameter(torch.randn(num_element_types, d_model) * std)
    self.bias = nn.Parameter(torch.zeros(num_element_types))

  def forward(self, features, feature_mask, inputs):
    b, t = inputs.shape
    token_mask = inputs != 0
    x = self.token_embed(inputs) + self.position_embed.weight[:t][None]
    memory = self.memory_norm(self.feature_proj(features))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    self_mask = (causal[None] & token_mask[:, None, :])[:, None]
    cross_mask = feature_mask[:, None, None, :]
    for i in range(self.num_layers):
      x = self.layers[i % len(self.layers)](x, self_mask, memory, cross_mask)
    h = self.final_norm(x)
    detail = h @ self.token_embed.weight.t()
    semantic = self.semantic(h)
    scores = torch.einsum('btd,ed->bet', h, self.queries)
    scores = scores.masked_fill(~token_mask[:, None, :], -1e30)
    pooled = torch.einsum('bet,btd->bed', scores.softmax(-1), h)
    element = torch.einsum('bed,ed->be', pooled, self.readout) + self.bias
    return detail.float(), semantic.float(), element.float()


def masked_mean(x, mask):
  mask = mask.float()
  return (x * mask).sum() / mask.sum().clamp(min=1.0)


def loss_fn(outputs, batch, element_ids):
  detail, semantic, element = outputs
  logprobs = detail.log_softmax(-1)
  target_mask = batch['target_mask']
  nll = -logprobs.gather(-1, batch['targets'][..., None])[..., 0]
  sem_nll = F.cross_entropy(semantic.transpose(1, 2), batch['semantic_labels'], reduction='none')
  bce = F.binary_cross_entropy_with_logits(element, batch['element_labels'], reduction='none')
  p = logprobs[..., element_ids].exp()
  implied = torch.where(target_mask[..., None], p, 0.0).amax(dim=1)
  consistency = (implied - element.sigmoid()).square()
  return (0.4 * masked_mean(nll, target_mask)
          + 0.3 * masked_mean(sem_nll, batch['semantic_mask'])
          + 0.2 * bce.mean() + 0.1 * consistency.mean())


def make_optimizer(model, t, total_steps=1000):
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': t.weight_decay},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2))
  warmup = t.warmup_steps

  def lr_lambda(step):
    if step < warmup:
      return step / max(1, warmup)
    cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return t.end_learning_rate_ratio + (1 - t.end_learning_rate_ratio) * cos
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def make_step(model, opt, sched, element_ids, grad_clip_norm, autocast_bf16: bool):
  """One train step: forward, loss, backward, clip, AdamW, schedule. Returns the loss tensor."""
  element_ids = torch.as_tensor(element_ids)

  def step(batch):
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast_bf16):
      outputs = model(batch['features'], batch['feature_mask'], batch['inputs'])
    loss = loss_fn(outputs, batch, element_ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    opt.step()
    sched.step()
    return loss.detach()
  return step


def to_torch(batch):
  # Index arguments (gather) want int64.
  return {k: torch.from_numpy(v.astype('int64') if v.dtype.kind == 'i' else v.copy())
          for k, v in batch.items()}


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


def load_from_jax(model, params) -> None:
  """Copies our model's parameters (an nnx.State of Phase1Decoder Params) into the twin, so the
  two can be checked to compute the same loss. Linear kernels [in, out] become weights [out, in];
  stacked layer params [U, ...] go to model.layers[u]."""
  import jax
  import numpy as np
  key = lambda k: str(getattr(k, 'key', getattr(k, 'name', k)))
  flat = {tuple(key(k) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  rename = {'embedding': 'weight', 'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
            'queries_ExD': 'queries', 'readout_ExD': 'readout', 'bias_E': 'bias'}
  targets = {}
  for path, value in flat.items():
    path = [p for p in path if p != 'value']
    stacked = path[0] == 'backbone'
    names = path[2:] if stacked else path
    if names[0] == 'heads':
      names = names[1:]
    if names[0] == 'element_classifier':
      names = names[1:]
    names = names[:-1] + [rename[names[-1]]]
    if path[-1] == 'kernel':
      value = np.swapaxes(value, -1, -2)
    if stacked:
      for u in range(value.shape[0]):
        targets['.'.join(['layers', str(u)] + names)] = value[u]
    else:
      targets['.'.join(names)] = value
  state = model.state_dict()
  missing = set(state) ^ set(targets)
  if missing:
    raise ValueError(f'parameter names differ: {sorted(missing)}')
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in targets.items()})
