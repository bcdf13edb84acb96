"""Routing statistics of an MoE causal LM: is the router far from uniform, do experts specialise?

Per layer, over the (non-padding) tokens of texts grouped by domain:
- `usage_entropy`: entropy of the overall top-k expert usage / log(E); the balance loss keeps
  this near 1 (every expert gets work), so it is not evidence of specialisation by itself;
- `token_entropy`: mean entropy of each token's router distribution / log(E); 1.0 is a
  uniform (untrained) router, low values mean confident, peaked routing;
- `domain_mutual_information`: I(domain; chosen expert) / H(domain), 0 when every domain
  uses the experts alike, 1 when the expert identifies the domain;
- per domain: expert usage shares, its two most used experts and their share of the
  domain's assignments (`top2_share`; uniform routing gives 2/E).
"""

from __future__ import annotations

from typing import Any

import torch

from perft.routing.stats import RoutingCounts, mutual_information, normalized_entropy


@torch.no_grad()
def router_logits_for(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 32
) -> list[torch.Tensor]:
    """Per layer, `[num_tokens, num_experts]` router logits over the non-padding tokens of `texts`."""
    per_layer: list[list[torch.Tensor]] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
        out = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_router_logits=True
        )
        keep = enc["attention_mask"].reshape(-1).bool()
        for layer, logits in enumerate(out.router_logits):
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(logits.reshape(keep.shape[0], -1)[keep].float())
    return [torch.cat(chunks) for chunks in per_layer]


@torch.no_grad()
def routing_stats(
    model: torch.nn.Module, tokenizer: Any, texts_by_domain: dict[str, list[str]]
) -> dict[str, Any]:
    """Routing statistics (see the module docstring) as a JSON-ready dict.

    The counting and the formulas are `perft.routing.stats` (one `RoutingCounts` per layer,
    one group per domain); this function only arranges them per domain.
    """
    was_training = model.training
    model.eval()
    config = model.config
    num_experts, top_k = int(config.num_experts), int(config.num_experts_per_tok)
    logits = {d: router_logits_for(model, tokenizer, texts) for d, texts in texts_by_domain.items() if texts}
    model.train(was_training)
    names = list(logits)
    num_layers = len(logits[names[0]])
    layers = []
    for layer in range(num_layers):
        counts = RoutingCounts(num_experts, top_k, num_groups=len(names))
        for group, domain in enumerate(names):
            probs = logits[domain][layer].softmax(-1)
            counts.update(
                probs.topk(top_k, dim=-1).indices,
                probs=probs,
                groups=torch.full((probs.shape[0],), group, dtype=torch.long),
            )
        overall = counts.summary()
        domains = {}
        for group, domain in enumerate(names):
            share = torch.tensor(counts.summary(group)["utilisation"], dtype=torch.float64)
            top = share.topk(min(2, num_experts))
            domains[domain] = {
                "usage": [round(float(x), 4) for x in share],
                "top_experts": [int(i) for i in top.indices],
                "top2_share": round(float(top.values.sum()), 4),
                "tokens": int(counts.tokens[group]),
            }
        mi, h_domain, _ = mutual_information(counts.counts)
        layers.append(
            {
                "usage": [round(float(x), 4) for x in overall["utilisation"]],
                "usage_entropy": round(normalized_entropy(counts.counts.sum(0)), 4),
                "token_entropy": round(overall["token_entropy"], 4),
                "domain_mutual_information": round(mi / h_domain, 4) if h_domain > 0 else 0.0,
                "domains": domains,
            }
        )
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "uniform_top2_share": round(min(2, num_experts) / num_experts, 4),
        "layers": layers,
    }
