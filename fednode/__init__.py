"""fedchain's federation side, one subpackage per part of the data flow train -> package -> publish -> anchor ->
verify -> merge -> finalize -> audit: `learning` (data, base models, local training, DP), `protocol` (rules,
packaging, publishing, the node, verification, the merge, the aggregator), `strategies` (aggregation rules),
`storage` (CIDs and stores), `audit`, and `ops` (the `fedchain` command, configs, long-running services, the
in-process federation)."""
