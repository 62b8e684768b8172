class LedgerRouter:
    """The ledger app on the ``ledger`` alias, everything else on ``default``."""

    def db_for_read(self, model, **hints):
        return "ledger" if model._meta.app_label == "ledger" else None

    db_for_write = db_for_read

    def allow_migrate(self, db, app_label, **hints):
        if app_label == "ledger":
            return db == "ledger"
        return db == "default"
