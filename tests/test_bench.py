"""jobs.bench's step variants: the same step with and without the kernel's Monte-Carlo form."""

import pytest
import torch

import service.gaussian as gaussian
from jobs.bench import Stepper
from service import mixture_native


@pytest.mark.skipif(mixture_native.library() is None, reason="no C compiler: no Monte-Carlo form")
def test_the_samples_variant_runs_the_same_step_through_the_sample_path(monkeypatch):
    torch.set_num_threads(1)
    seen = []
    original = gaussian.mixture_log_prob_and_usage
    monkeypatch.setattr(gaussian, "mixture_log_prob_and_usage", lambda *a, **k: seen.append(a[0].shape) or original(*a, **k))
    fused, plain = Stepper("8gaussians/mog-ip-lc", batch=64), Stepper("8gaussians/mog-ip-lc:samples", batch=64)
    fused.step()
    assert not seen and gaussian.MC_FORM  # the MC form evaluates the samples inside the kernel
    plain.step()
    assert gaussian.MC_FORM  # restored after the step
    assert len(seen) == 4 and {s[0] for s in seen} == {100 * 64, 100 * 128}  # T * B rows per evaluation
    for a, b in zip(fused.model.parameters(), plain.model.parameters()):  # same draws, same step
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_unknown_variant_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'samples'"):
        Stepper("8gaussians/mog-ip-lc:fast")
