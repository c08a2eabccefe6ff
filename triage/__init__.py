"""The triage assistant: a small local model, trained on the store's own tickets, that suggests
a category and an assignee for a new ticket, and the one-line summary of the ticket list.

Nothing here touches the network: the model is scikit-learn, kept in the store (docs/triage.md).
"""
