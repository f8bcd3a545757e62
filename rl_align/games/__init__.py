"""The theory lab: exact small-scale checks of the three source papers' claims (``rl-align game``).

``matrix``: preference matrix games (MD/MWU, OMWU, Mirror-Prox, INPO, COMAL, iterative DPO/IPO, SPPO);
``bandit``: constrained bandits (PD vs OPD); ``tabular_sail``: exact SAIL vs SAIL-RevKL landscapes.
"""

from rl_align.games.bandit import lp_optimum, primal_dual
from rl_align.games.matrix import ALGORITHMS, duality_gap, load_matrix, nash, run
from rl_align.games.tabular_sail import sweep

__all__ = ["ALGORITHMS", "duality_gap", "load_matrix", "lp_optimum", "nash", "primal_dual", "run", "sweep"]
