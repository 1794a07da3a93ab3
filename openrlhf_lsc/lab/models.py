"""Tiny policy and reward models for the lab, in the formats OpenRLHF loads; SFT and Bradley-Terry training.

The policy is a `LlamaForCausalLM` built from a config. A reward model is OpenRLHF's layout
(`openrlhf.models.get_llm_for_sequence_regression`, model_type "reward"): the base `LlamaModel`
under `model.` plus a bias-free linear head named `score` (OpenRLHF's `--ds.value_head_prefix`
default), read at the last attended token. The critic is the same layout read at every token, as
OpenRLHF's critic. All are saved with `save_pretrained`, so `--actor.model_name_or_path`,
`--reward.model_name_or_path` and `--critic.model_name_or_path` accept the lab's folders. This module
does not import OpenRLHF.
"""

import random
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from openrlhf_lsc.lab import world

PAD, EOS = 0, 2
PROMPT_LEN = 5


def policy_config(hidden: int = 64, layers: int = 2) -> LlamaConfig:
    """Config of the tiny policy (and of the reward models and critic built on its body)."""
    cfg = LlamaConfig(
        vocab_size=len(world.vocabulary()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


class RewardModel(LlamaPreTrainedModel):
    """OpenRLHF's reward/critic layout: `model` (LlamaModel) + `score` (Linear, no bias)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token head outputs `[B, T]` (positions as OpenRLHF computes them)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.score(hidden).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward `[B]`: the head at the last attended token (the EOS), as OpenRLHF's RewardModel."""
        eos = attention_mask.size(1) - 1 - attention_mask.long().fliplr().argmax(dim=1, keepdim=True)
        return self.values(input_ids, attention_mask).gather(1, eos).squeeze(1)

    def action_values(self, sequences: torch.Tensor, attention_mask: torch.Tensor, n_actions: int) -> torch.Tensor:
        """Critic values `[B, n_actions]`: value of the state before each response token (OpenRLHF's CriticModel)."""
        return self.values(sequences, attention_mask)[:, :-1][:, -n_actions:]


def new_policy(seed: int, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(policy_config(hidden, layers))


def reward_model_from(policy: LlamaForCausalLM, seed: int, eos_scale: float = 1.0) -> RewardModel:
    """A reward model whose body starts from the (SFT) policy, as OpenRLHF's train_rm does with --model.model_name_or_path.

    `eos_scale` > 1 multiplies the EOS token's embedding and freezes it (its gradient is zeroed): the hidden state
    the head reads at the EOS then carries a large fixed component, so the final RMSNorm divides by a nearly
    constant norm and the score is close to linear in the content features instead of capped near the best SFT
    answers. Same layout and loaders as any reward model (only weights change).
    """
    torch.manual_seed(seed)
    rm = RewardModel(policy.config)
    rm.model.load_state_dict(policy.model.state_dict())
    rm.score.weight.data.normal_(mean=0.0, std=1 / (policy.config.hidden_size + 1))  # OpenRLHF's init_value_head
    if eos_scale != 1.0:
        emb = rm.model.embed_tokens.weight
        with torch.no_grad():
            emb[EOS] *= eos_scale
        emb.register_hook(lambda grad: grad.index_fill(0, torch.tensor([EOS]), 0.0))
    return rm


def encode_prompts(texts: Sequence[str]) -> torch.Tensor:
    """Prompt texts (all `PROMPT_LEN` words) -> `[B, PROMPT_LEN]` ids."""
    index = world.token_index()
    return torch.tensor([[index[w] for w in t.split()] for t in texts], dtype=torch.long)


def encode_responses(responses: Sequence[Sequence[str]], length: int = world.MAX_NEW_TOKENS) -> torch.Tensor:
    """Words -> `[B, length]` ids with EOS appended and PAD after it."""
    index = world.token_index()
    out = torch.full((len(responses), length), PAD, dtype=torch.long)
    for i, words in enumerate(responses):
        ids = [index[w] for w in words][: length - 1] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def decode_responses(responses: torch.Tensor) -> List[List[str]]:
    """`[B, L]` ids -> words, stopping at EOS."""
    vocab = world.vocabulary()
    out = []
    for row in responses.tolist():
        words = []
        for t in row:
            if t in (EOS, PAD):
                break
            words.append(vocab[t])
        out.append(words)
    return out


def action_mask(responses: torch.Tensor) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS (OpenRLHF's action mask)."""
    is_eos = responses == EOS
    before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before this position
    return (before == 0).float()


@torch.no_grad()
def sample(policy: LlamaForCausalLM, prompt_ids: torch.Tensor, generator: torch.Generator,
           max_new: int = world.MAX_NEW_TOKENS) -> torch.Tensor:
    """Sample responses at temperature 1 (no top-k/top-p, as OpenRLHF's rollout defaults); `[B, max_new]`, PAD after EOS.

    A response still open at the last position is closed with EOS there (at most `max_new - 1` words), so a reward
    model always reads an EOS as in its training data; vLLM would leave it truncated.
    """
    policy.eval()
    out = policy(prompt_ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    tokens = []
    for i in range(max_new):
        nxt = torch.multinomial(logits.float().softmax(-1), 1, generator=generator).squeeze(1)
        if i == max_new - 1:
            nxt = torch.full_like(nxt, EOS)
        nxt = nxt.masked_fill(done, PAD)
        tokens.append(nxt)
        done |= nxt == EOS
        if done.all():
            break
        out = policy(nxt[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    responses = torch.stack(tokens, 1)
    return F.pad(responses, (0, max_new - responses.shape[1]), value=PAD)


def response_logprobs(policy: LlamaForCausalLM, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Log-probabilities `[B, L]` of the response tokens under `policy` (with grad if enabled)."""
    seq = torch.cat([prompt_ids, responses], 1)
    logits = policy(seq).logits[:, prompt_ids.shape[1] - 1 : -1].float()
    return torch.gather(logits.log_softmax(-1), 2, responses.unsqueeze(-1)).squeeze(-1)


def sequences_and_mask(prompt_ids: torch.Tensor, responses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompt+response ids and their attention mask (prompt and actions attended, padding not)."""
    mask = torch.cat([torch.ones_like(prompt_ids, dtype=torch.float), action_mask(responses)], 1)
    return torch.cat([prompt_ids, responses], 1), mask.long()


@torch.no_grad()
def score(rm: RewardModel, prompt_ids: torch.Tensor, responses: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Rewards `[B]` of prompt+response under a reward model."""
    rm.eval()
    out = []
    for i in range(0, len(responses), batch):
        seq, mask = sequences_and_mask(prompt_ids[i : i + batch], responses[i : i + batch])
        out.append(rm(seq, mask))
    return torch.cat(out).float()


def train_sft(policy: LlamaForCausalLM, prompts: Sequence[world.Prompt], demos: Sequence[Sequence[str]],
              epochs: int, lr: float, batch: int, seed: int) -> List[float]:
    """Supervised fine-tuning on (prompt, demonstration) pairs, loss on response tokens incl. EOS. Returns epoch losses."""
    prompt_ids, responses = encode_prompts([p.text for p in prompts]), encode_responses(demos)
    mask = action_mask(responses)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    rng = random.Random(seed)
    order = list(range(len(demos)))
    losses = []
    policy.train()
    for _ in tqdm(range(epochs), desc="SFT", leave=False):
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = torch.tensor(order[i : i + batch])
            logp = response_logprobs(policy, prompt_ids[idx], responses[idx])
            loss = -(logp * mask[idx]).sum() / mask[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    return losses


def train_reward_model(rm: RewardModel, prompt_ids: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                       epochs: int, lr: float, batch: int, seed: int, desc: str = "RM",
                       loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor, List[int]], torch.Tensor]] = None,
                       on_epoch: Optional[Callable[[int, RewardModel], None]] = None) -> List[float]:
    """Pairwise training, by default Bradley-Terry: loss -log sigmoid(r_chosen - r_rejected) (OpenRLHF's PairWiseLoss);
    `loss_fn(r_chosen, r_rejected, pair indices)` replaces it; `on_epoch(epoch, rm)` runs after each epoch (1, 2, ...;
    e.g. to evaluate and keep checkpoints; `rm` is back in training mode after it). Returns epoch losses."""
    opt = torch.optim.Adam(rm.parameters(), lr=lr)
    rng = random.Random(seed)
    order = list(range(len(chosen)))
    losses = []
    rm.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = torch.tensor(order[i : i + batch])
            p = torch.cat([prompt_ids[idx], prompt_ids[idx]])
            seq, mask = sequences_and_mask(p, torch.cat([chosen[idx], rejected[idx]]))
            r = rm(seq, mask)
            if loss_fn is None:
                loss = -F.logsigmoid(r[: len(idx)] - r[len(idx) :]).mean()
            else:
                loss = loss_fn(r[: len(idx)], r[len(idx) :], idx.tolist())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
        if on_epoch is not None:
            on_epoch(len(losses), rm)
            rm.train()
    rm.eval()
    return losses


def bradley_terry_labels(gold_a: torch.Tensor, gold_b: torch.Tensor, temperature: float,
                         generator: torch.Generator) -> torch.Tensor:
    """True where a is preferred: P(a > b) = sigmoid((g_a - g_b) / temperature)."""
    p = torch.sigmoid((gold_a - gold_b) / temperature)
    return torch.rand(p.shape, generator=generator) < p


def sample_batched(policy: LlamaForCausalLM, prompt_ids: torch.Tensor, generator: torch.Generator,
                   batch: int = 2048) -> torch.Tensor:
    """`sample` in chunks of `batch` prompts, one generator throughout."""
    return torch.cat([sample(policy, prompt_ids[i : i + batch], generator) for i in range(0, len(prompt_ids), batch)])


def score_batched(rm: RewardModel, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    return score(rm, prompt_ids, responses, batch=1024)


def load_policy(path: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def load_rm(path: str) -> RewardModel:
    return RewardModel.from_pretrained(path, attn_implementation="sdpa").eval()
