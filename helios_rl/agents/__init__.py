"""Agents: Stable-Baselines3 training (:mod:`.train`), evaluation against baselines (:mod:`.compare`),
agent hyperparameter files (:mod:`.config`) and rliable-style statistics (:mod:`.stats`)."""
