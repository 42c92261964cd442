"""Quick start: make a network Bayesian, train it on real digits, and read its uncertainty.

Runs in well under a minute on 2 CPU cores, offline (scikit-learn's 8x8 digits). Digits
8 and 9 are held out of training: the Bayesian model should be more uncertain about them.
For the full comparison with an HTML report, run ``torchbayes demo``.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes import metrics
from torchbayes.datasets import load_dataset

torch.manual_seed(0)
data = load_dataset("digits", ood_classes=(8, 9))


def fit(model: nn.Module, epochs: int, lr: float) -> None:
    """Adam on the training split; the loss is the negative ELBO for a Bayesian model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.train_x)).split(64):
            nll = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss = torchbayes.elbo_loss(nll, model, num_data=len(data.train_x))  # nll + KL / N
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


# 1. A plain network, trained as usual.
net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, data.num_classes))
fit(net, epochs=10, lr=2e-3)

# 2. Its Bayesian twin: one call, with the reference's settings dictionary. MOPED starts the
#    posterior at the trained weights (sigma = 0.1 |w|) and centres the prior on them.
bnn = torchbayes.dnn_to_bnn(copy.deepcopy(net), {
    "prior_mu": 0.0, "prior_sigma": 0.1, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
    "type": "Flipout", "moped_enable": True, "moped_delta": 0.1})
fit(bnn, epochs=3, lr=1e-3)

# 3. Predict with 32 posterior samples: probabilities plus the uncertainty decomposition.
test = torchbayes.predict(bnn, data.test_x, num_samples=32, seed=0)
ood = torchbayes.predict(bnn, data.ood_x, num_samples=32, seed=0)
with torch.no_grad():
    plain = net(data.test_x).softmax(-1)

print(f"{'':28}{'deterministic':>14}{'Bayesian':>10}")
print(f"{'accuracy':28}{float(metrics.accuracy(plain, data.test_y)):>14.3f}"
      f"{float(metrics.accuracy(test.mean, data.test_y)):>10.3f}")
print(f"{'ECE':28}{float(metrics.expected_calibration_error(plain, data.test_y)):>14.4f}"
      f"{float(metrics.expected_calibration_error(test.mean, data.test_y)):>10.4f}")
print(f"mean mutual information: test digits {float(test.mutual_information.mean()):.4f}, "
      f"unseen digits 8/9 {float(ood.mutual_information.mean()):.4f}")
print(f"OOD AUROC by mutual information: "
      f"{float(metrics.ood_auroc(test.mutual_information, ood.mutual_information)):.3f} (0.5 = chance)")
print("Next: `torchbayes demo` trains LeNet on MNIST and writes an HTML report.")
