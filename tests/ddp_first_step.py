"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): pretrain.py's Barlow Twins
step under DDP against one single-process step on the same global batch.

    torchrun --standalone --nproc_per_node=2 tests/ddp_first_step.py CONFIG OUT.json

Every rank builds the same initial network; the DDP copy takes pretrain.barlow_step on its half of the global
batch; a plain copy takes one step on the whole batch, made of the same views (each half drawn from its rank's
generator, seed + rank). Rank 0 writes the two losses and the largest differences in weights and BatchNorm
statistics after the step.
"""
import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import pretrain  # noqa: E402
import utils  # noqa: E402

cfg = utils.load_config(sys.argv[1])
pc, width = cfg["pretrain"], cfg["network"]["width"]
ranks, device = utils.init_ranks("cpu")
data = utils.load_data(cfg)
torch.manual_seed(0)
net, _ = pretrain.build(pc, width, device)  # the same initial network on every rank
single, initial = copy.deepcopy(net), copy.deepcopy(net)


def lars(m):
    return models.LARS(models.lars_param_groups(m.backbone, m.projector), lr=0.5, momentum=pc["momentum"],
                       weight_decay=pc["weight_decay"], eta=pc["lars_eta"])


b = pc["batch_size"] // ranks.world
parts = [models.shard(data.train_x, models.Ranks(r, ranks.world))[:b] for r in range(ranks.world)]

# the same step with BatchNorm per rank (no sync): what the comparison must be able to tell apart
unsynced = copy.deepcopy(net)
unsynced_loss = pretrain.barlow_step(DDP(unsynced), lars(unsynced), parts[ranks.rank], data, pc,
                                     models.make_generator(device, cfg["seed"] + ranks.rank), device)

# the distributed step: pretrain.py's own code path
net = models.sync_batchnorm(net, device)
loss = pretrain.barlow_step(DDP(net), lars(net), parts[ranks.rank], data, pc,
                            models.make_generator(device, cfg["seed"] + ranks.rank), device)

# the single-process step on the same global batch of views
views = [pretrain.barlow_views(x, data.mean, data.std, pc, models.make_generator(device, cfg["seed"] + r))
         for r, x in enumerate(parts)]
opt = lars(single)
z1, z2 = single(torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views]))
single_loss = models.barlow_twins_loss(z1, z2, pc["lambda_offdiag"], pc["loss_scale"])
opt.zero_grad()
single_loss.backward()
opt.step()

diff = lambda a, b: max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
scale = max(p.abs().max().item() for p in single.parameters())
if ranks.main:
    Path(sys.argv[2]).write_text(json.dumps({
        "world": ranks.world, "global_batch": b * ranks.world, "loss": loss.item(), "single_loss": single_loss.item(),
        "unsynced_loss": unsynced_loss.item(),
        "max_weight_diff": diff(net.parameters(), single.parameters()), "max_weight": scale,
        "max_buffer_diff": diff(net.buffers(), single.buffers()),
        "step_size": diff(single.parameters(), initial.parameters())}))
