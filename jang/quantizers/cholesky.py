"""The one factorization GPTQ needs, in place in the Hessian's float32 buffer.

GPTQ on an 8192-input projection has an 8192 x 8192 Hessian (268 MB in float32);
library Cholesky routines return a new matrix and an inverse another, so a solver
built on them holds two or three such matrices at once. Here the factor is written
over the Hessian, block by block, with matrix products of one block column at a
time through MLX (so temporaries are n x block, not n x n).

The factor is the "reversed" one GPTQ uses: upper triangular R with H = R R^T
(Cholesky of H with its index order reversed). It is written to the upper triangle
only; the strict lower triangle still holds H, so a failed factorization can be
undone and retried with more damping.
"""

import warnings

import mlx.core as mx
import numpy as np

BLOCK = 512


def factor_damped(h: np.ndarray, damp: float, tries: int = 4) -> np.ndarray:
    """R (upper triangle of h, in place) with H + lambda I = R R^T, lambda = damp x mean
    diagonal. float32 Cholesky can break down on a nearly singular H where float64 would
    not: then lambda grows tenfold (with a warning), up to ``tries`` times."""
    diag = np.diag(h).copy()
    lam = damp * float(np.mean(diag, dtype=np.float64))
    for attempt in range(tries):
        h[np.diag_indices_from(h)] = diag + lam
        if reverse_cholesky(h):
            if attempt:
                warnings.warn(f"GPTQ: Hessian needed damping {lam:.3g} (damp x {10 ** attempt}) "
                              "to factor in float32", stacklevel=3)
            return h
        restore_upper(h)
        lam *= 10
    raise ValueError("Hessian is not positive definite even after damping; check it or raise damp")


def reverse_cholesky(h: np.ndarray, block: int = BLOCK) -> bool:
    """Overwrite h's upper triangle with R, upper triangular, H = R R^T (H read from the
    upper triangle); the strict lower triangle is left as it was. False if H is not
    (numerically) positive definite.

    Blocks from the bottom right: with H = [[A, B], [B^T, C]] and C = Rc Rc^T already
    factored, R = [[Ra, X], [0, Rc]] where X = B Rc^-T and Ra Ra^T = A - X X^T."""
    n = h.shape[0]
    starts = range(0, n, block)
    for k0 in reversed(starts):
        k1 = min(k0 + block, n)
        kk = h[k0:k1, k0:k1]
        d = np.triu(kk) + np.triu(kk, 1).T
        # the block's own reversed Cholesky: chol(J D J) = L gives D = (J L J)(J L J)^T
        low = mx.linalg.cholesky(mx.array(np.ascontiguousarray(d[::-1, ::-1])), stream=mx.cpu)
        rkk = np.asarray(low)[::-1, ::-1]
        # MLX does not report a failed factorization; LAPACK leaves a diagonal entry <= 0 or NaN
        if not np.all(np.diag(rkk) > 0):
            return False
        upper = np.triu_indices(k1 - k0)
        kk[upper] = rkk[upper]
        if k0 == 0:
            return True
        # X solves X Rkk^T = B, i.e. Rkk X^T = B^T
        xt = mx.linalg.solve_triangular(mx.array(np.ascontiguousarray(rkk)), mx.array(np.ascontiguousarray(h[:k0, k0:k1].T)),
                                        upper=True, stream=mx.cpu)
        x = mx.contiguous(xt.T)
        h[:k0, k0:k1] = np.asarray(x)
        # A -= X X^T, upper triangle only, one block column at a time
        for j0 in range(0, k0, block):
            j1 = min(j0 + block, k0)
            xj = x[j0:j1]
            if j0:
                h[:j0, j0:j1] -= np.asarray(mx.matmul(x[:j0], xj.T, stream=mx.cpu))
            jj = h[j0:j1, j0:j1]
            upper = np.triu_indices(j1 - j0)
            jj[upper] -= np.asarray(mx.matmul(xj, xj.T, stream=mx.cpu))[upper]
    return True


def restore_upper(h: np.ndarray, block: int = BLOCK):
    """Copy the strict lower triangle (the untouched H) over the upper one; the
    diagonal is the caller's to restore."""
    n = h.shape[0]
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        h[:j0, j0:j1] = h[j0:j1, :j0].T
        jj = h[j0:j1, j0:j1]
        upper = np.triu_indices(j1 - j0, 1)
        jj[upper] = jj.T[upper]


def permute_symmetric(h: np.ndarray, perm: np.ndarray, block: int = BLOCK):
    """h <- h[perm][:, perm] in place, with one block of rows as scratch: columns are
    permuted block of rows by block of rows, then rows by following the permutation's
    cycles (each row moved once)."""
    n = h.shape[0]
    for r0 in range(0, n, block):
        h[r0:r0 + block] = h[r0:r0 + block][:, perm]
    done = np.zeros(n, bool)
    for start in range(n):
        if done[start]:
            continue
        done[start] = True
        if perm[start] == start:
            continue
        saved, i = h[start].copy(), start
        while perm[i] != start:  # row i takes old row perm[i]
            h[i] = h[perm[i]]
            i = perm[i]
            done[i] = True
        h[i] = saved
