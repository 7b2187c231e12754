from django.apps import AppConfig


class PayoutsConfig(AppConfig):
    name = "payouts"
    verbose_name = "Payouts"

    def ready(self) -> None:
        import txutils
        from payouts.metrics import count_retries
        from payouts.txlog_sink import store_transaction_log

        txutils.add_sink(store_transaction_log, before_commit=True)
        txutils.add_sink(count_retries)
