"""Notifications to the systems that run the reading worklist: HL7 v2 ORU^R01 over MLLP and
webhooks, sent when a study is flagged and when its flag is withdrawn, from a durable outbox in the
ledger (:class:`node.notify.loop.NotificationLoop`)."""
