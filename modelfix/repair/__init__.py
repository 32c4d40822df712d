"""The repair methods (one module each, registered in `registry`), and `modelfix.repair(...)` itself.

The package is callable: `modelfix.repair(model, data, method="pca-egem", **options)` runs the application
layer's `repair` (a module whose class defines `__call__`), so `modelfix.repair.egem` and friends stay importable
under the same name.
"""

import sys
import types


class CallablePackage(types.ModuleType):
    def __call__(self, model, data=None, method: str = "pca-egem", **options):
        """Repair a copy of `model` with `method`; returns a `RepairResult` (`modelfix.app.repair.repair`)."""
        from modelfix.app.repair import repair

        return repair(model, data, method, **options)


sys.modules[__name__].__class__ = CallablePackage
