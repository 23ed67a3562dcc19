"""The federation protocol: the rules a round commits to, packaging and publishing adapters, the chain history
(`ledger`), the hospital's node, verification of submissions, the merge and the aggregator."""
