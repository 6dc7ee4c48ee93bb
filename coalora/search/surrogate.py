"""The surrogate and the acquisition (SPEC §5): a botorch GP on f1 over normalised option indices, f2 exact,
and qLogEHVI of both with fixed quasi-MC samples."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
from botorch.models import ModelList, SingleTaskGP
from botorch.models.deterministic import GenericDeterministicModel
from botorch.models.model import Model
from botorch.models.transforms import Standardize
from botorch.models.transforms.outcome import OutcomeTransform
from botorch.optim.fit import fit_gpytorch_mll_scipy
from botorch.posteriors import GPyTorchPosterior
from botorch.sampling import ListSampler, SobolQMCNormalSampler
from botorch.sampling.index_sampler import IndexSampler
from botorch.utils.multi_objective.box_decompositions import (
    FastNondominatedPartitioning,
)
from gpytorch.distributions import MultivariateNormal
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.operators import DiagLinearOperator
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from coalora.errors import CoaloraError
from coalora.quant.options import FIELD_SIZES
from coalora.quant.qconfig import ConfigSpace


def fit_gp(x: Tensor, f1: Tensor, maxiter: int = 100) -> SingleTaskGP:
    """A SingleTaskGP on -f1 over normalised encodings, fitted by a bounded, deterministic L-BFGS-B.

    Inputs are already in [0, 1] by known field sizes (constant columns are harmless); Standardize maps
    constant or single outcomes to unit scale instead of dividing by zero. No random restarts: the fit
    never touches the global RNG, so resumed and DDP runs agree. A failed fit keeps the prior's
    hyperparameters (with a warning) rather than ending the training run.
    """
    with warnings.catch_warnings():
        # expected here: outcomes that Standardize cannot scale (all equal), maxiter reached, jitter added
        for category in (InputDataWarning, OptimizationWarning, NumericalWarning):
            warnings.simplefilter("ignore", category)
        gp = SingleTaskGP(x.double(), -f1.double().unsqueeze(-1), outcome_transform=Standardize(m=1))
        mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
        mll.train()
        prior = {k: v.clone() for k, v in mll.state_dict().items()}
        try:
            fit_gpytorch_mll_scipy(mll, options={"maxiter": maxiter})
            failure = None
        except (RuntimeError, ValueError) as err:
            mll.load_state_dict(prior)
            failure = err
    if failure is not None:
        warnings.warn(f"GP fit failed ({failure}); using the prior hyperparameters", stacklevel=2)
    mll.eval()
    return gp


class MarginalGP(Model):
    """A fitted single-output exact GP seen through its marginals: b points cost one (b, n) cross-kernel.

    gpytorch's exact prediction builds the joint kernel of train and test points, (n + b)² · d work, which
    dominates a step of 1440 neighbours at d = 720; EHVI of single points (q = 1) needs only each point's
    mean and variance, computed here from a Cholesky factor cached once per fit.
    """

    def __init__(self, gp: SingleTaskGP) -> None:
        super().__init__()
        gp.eval()
        self.gp = gp
        x = gp.train_inputs[0]
        with torch.no_grad():
            k = gp.covar_module(x).to_dense()
            k = k + gp.likelihood.noise.reshape(-1)[0] * torch.eye(len(x), dtype=k.dtype)
            self.chol = psd_safe_cholesky(k)
            residual = (gp.train_targets - gp.mean_module(x)).unsqueeze(-1)
            self.alpha = torch.cholesky_solve(residual, self.chol)

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    def posterior(self, X: Tensor, output_indices=None, observation_noise=False, posterior_transform=None):
        if X.shape[-2] != 1:
            raise CoaloraError("MarginalGP evaluates single points (q = 1) only")
        flat = X.reshape(-1, X.shape[-1])
        gp = self.gp
        cross = gp.covar_module(flat, gp.train_inputs[0]).to_dense()  # (b, n)
        mean = gp.mean_module(flat) + (cross @ self.alpha).squeeze(-1)
        reduced = torch.linalg.solve_triangular(self.chol, cross.T, upper=False)
        variance = (gp.covar_module(flat, diag=True) - reduced.square().sum(0)).clamp_min(1e-12)
        transform = gp.outcome_transform
        assert isinstance(transform, OutcomeTransform)  # fit_gp always standardises
        mean, untransformed = transform.untransform(mean.unsqueeze(-1), variance.unsqueeze(-1))
        assert untransformed is not None
        variance = untransformed
        shape = X.shape[:-1]
        mvn = MultivariateNormal(mean.reshape(shape), DiagLinearOperator(variance.reshape(shape)))
        return GPyTorchPosterior(mvn)


class EncodingBits:
    """f2 as a botorch-callable: normalised encodings (..., d) -> exact avg_bits (...)."""

    def __init__(self, space: ConfigSpace) -> None:
        self.space = space
        self.fields = len(space.family.field_sizes)
        self.top = field_tops(len(space), space.family.field_sizes).double()

    def __call__(self, x: Tensor) -> Tensor:
        """Bits of the configuration each point becomes (an option a matrix's rows do not allow is moved to
        the nearest allowed one first, as :meth:`~coalora.quant.qconfig.ConfigSpace.restrict` does)."""
        indices = torch.round(x.double() * self.top).long().clamp_min(0)
        indices = torch.minimum(indices, self.top.long())
        encoded = indices.reshape(*x.shape[:-1], len(self.space), self.fields)
        return self.space.avg_bits_encoded(self.space.restrict(encoded))


def field_tops(num_matrices: int, field_sizes: Sequence[int] = FIELD_SIZES) -> Tensor:
    """Largest index of every flat coordinate: (d,) long (``field_sizes``: the code family's)."""
    return (torch.tensor(tuple(field_sizes), dtype=torch.long) - 1).repeat(num_matrices)


def make_acquisition(
    gp: SingleTaskGP, bits: EncodingBits, y: Tensor, ref: Tensor, seed: int, mc_samples: int = 32
) -> qLogExpectedHypervolumeImprovement:
    """qLogEHVI of (f1, f2) over the archive's front, f2 exact via a deterministic model.

    Fixed quasi-MC base samples make the acquisition a deterministic function, so finite differences
    between neighbours measure the surface, not sampling noise.
    """
    model = ModelList(
        MarginalGP(gp), GenericDeterministicModel(lambda x: -bits(x).unsqueeze(-1), num_outputs=1)
    )
    partition = FastNondominatedPartitioning(ref_point=-ref.double(), Y=-y.double())
    shape = torch.Size([mc_samples])
    sampler = ListSampler(SobolQMCNormalSampler(shape, seed=seed), IndexSampler(shape, seed=seed))
    # botorch takes any box decomposition of the front here; its annotation names the slower class only
    return qLogExpectedHypervolumeImprovement(
        model,
        (-ref).tolist(),
        partition,  # type: ignore[arg-type]
        sampler=sampler,
    )


def batched(acq: Callable[[Tensor], Tensor], chunk: int = 1024) -> Callable[[Tensor], Tensor]:
    """Evaluate an acquisition on (b, d) points in chunks of (chunk, 1, d), without autograd."""

    def evaluate(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([acq(part.unsqueeze(1)) for part in x.split(chunk)])

    return evaluate
