from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from console import metrics, views

urlpatterns = [
    path("", views.home, name="home"),
    path("attention/", views.attention_page, name="attention"),
    path("payouts/", views.payout_list, name="payout-list"),
    path("payouts/<int:pk>/", views.payout_detail, name="payout-detail"),
    path("payouts/<int:pk>/resync/", views.payout_resync_view, name="payout-resync"),
    path("seller-payouts/", views.seller_payouts_page, name="seller-payouts"),
    path("seller-payouts/<int:pk>/resume/", views.payout_resume_view, name="payout-resume"),
    path("events/", views.event_list, name="event-list"),
    path("events/replay/", views.event_bulk_replay, name="event-bulk-replay"),
    path("events/preview/", views.event_preview_view, name="event-preview"),
    path("bulk-replays/", views.bulk_replay_list, name="bulk-replay-list"),
    path("bulk-replays/<int:pk>/", views.bulk_replay_detail, name="bulk-replay-detail"),
    path("bulk-replays/<int:pk>/cancel/", views.bulk_replay_cancel, name="bulk-replay-cancel"),
    path("bulk-replays/<int:pk>/decide/", views.bulk_replay_decide, name="bulk-replay-decide"),
    path("events/<int:pk>/", views.event_detail, name="event-detail"),
    path("events/<int:pk>/replay/", views.event_replay_view, name="event-replay"),
    path("events/<int:pk>/dismiss/", views.event_dismiss_view, name="event-dismiss"),
    path("transactions/", views.transaction_logs, name="transaction-logs"),
    path("reconciliation/", views.reconciliation_page, name="reconciliation"),
    path("health/", views.health, name="health"),
    path("audit/", views.audit_page, name="audit"),
    path("metrics", metrics.metrics_view, name="metrics"),  # answered by MetricsEndpoint
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("", include("payouts.urls")),
]
