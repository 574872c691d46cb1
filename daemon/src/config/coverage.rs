//! Field coverage of the CRD mirror: every field Drover parses is either enforced — and names
//! a test that exercises it — or gives a located warning saying it is not enforced when set, or
//! is refused, or is inert in Envoy too (a name). The field list comes from the mirror itself
//! ([`trace::fields`]), so adding a field to [`super::crd`] without deciding which fails here.
//! A name is not enough: the named test's source (its body, the functions and constants of its
//! file or the shared test helpers it uses, the fixtures they name) must mention the field (in
//! the CRD's spelling, or the validated policy's for unit tests over it), so a test that never
//! sets the field cannot stand for it.

mod trace;

use std::collections::BTreeSet;

/// How one field (or every field under a block) is covered.
enum How {
    /// Enforced; `file::function` is a test that exercises it.
    Enforced(&'static str),
    /// Accepted and not enforced: validating this spec (of the path's kind) gives a warning on a
    /// field containing `warning`.
    Warned {
        spec: &'static str,
        warning: &'static str,
    },
    /// Has no effect on traffic in Envoy either (names, labels for humans), with the reason.
    Inert(&'static str),
    /// Refused when set (as Istio refuses it): validating this spec gives an error on a field
    /// containing `error`.
    Rejected {
        spec: &'static str,
        error: &'static str,
    },
}

use How::{Enforced, Inert, Rejected, Warned};

/// Field path prefix → coverage; the longest prefix applies. `subsets[].trafficPolicy` and
/// `portLevelSettings[]` share the top-level `trafficPolicy` entries, and a ServiceEntry's
/// inline `endpoints[]` share `WorkloadEntry`'s.
const TABLE: &[(&str, How)] = &[
    // DestinationRule: selection.
    (
        "DestinationRule.host",
        Enforced("tests/tests/l7.rs::walkthrough_scenario1_splits_50_50_across_subsets"),
    ),
    (
        "DestinationRule.exportTo",
        Enforced(
            "daemon/src/registry/resolve/tests.rs::export_to_hides_rules_from_other_namespaces",
        ),
    ),
    (
        "DestinationRule.workloadSelector",
        Enforced(
            "tests/tests/kubernetes.rs::each_client_pod_gets_its_own_source_labels_routes_and_workload_selector_rules",
        ),
    ),
    (
        "DestinationRule.subsets",
        Enforced("tests/tests/l7.rs::walkthrough_scenario1_splits_50_50_across_subsets"),
    ),
    (
        "DestinationRule.trafficPolicy.portLevelSettings[].port",
        Enforced(
            "daemon/src/registry/resolve/tests.rs::port_level_settings_replace_and_do_not_inherit",
        ),
    ),
    // loadBalancer.
    (
        "DestinationRule.trafficPolicy.loadBalancer.simple",
        Enforced("tests/tests/l7.rs::least_request_avoids_a_slow_endpoint_round_robin_does_not"),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash",
        Enforced("tests/tests/l7.rs::consistent_hash_on_header_and_generated_cookie"),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash.httpQueryParameterName",
        Enforced("daemon/src/registry/route.rs::hash_keys_come_from_the_request"),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash.useSourceIp",
        Enforced(
            "tests/tests/kubernetes.rs::use_source_ip_hashes_each_workload_address_sticky_per_workload_spread_across",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash.maglev",
        Enforced(
            "daemon/src/registry/build.rs::consistent_hash_table_sizes_come_from_ring_hash_minimum_ring_size_and_maglev",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash.ringHash",
        Enforced(
            "daemon/src/registry/build.rs::consistent_hash_table_sizes_come_from_ring_hash_minimum_ring_size_and_maglev",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
        Enforced(
            "daemon/src/registry/build.rs::consistent_hash_table_sizes_come_from_ring_hash_minimum_ring_size_and_maglev",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.localityLbSetting",
        Enforced(
            "tests/tests/l7.rs::locality_keeps_traffic_local_and_fails_over_in_priority_order",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.localityLbSetting.distribute",
        Enforced("tests/tests/l7.rs::locality_distribute_splits_by_the_given_percentages"),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority",
        Enforced(
            "daemon/src/balance/locality/tests.rs::failover_priority_counts_the_matching_prefix",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.localityLbSetting.enabled",
        Enforced(
            "daemon/src/balance/locality/tests.rs::default_priorities_follow_region_zone_subzone_and_need_outlier_detection",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.warmup",
        Enforced(
            "tests/tests/l7.rs::warmup_gives_a_new_endpoint_a_small_share_that_grows_to_its_full_weight",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.warmup.aggression",
        Enforced("daemon/src/balance/tests.rs::warmup_ramps_new_endpoints_from_the_minimum_weight"),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.warmupDurationSecs",
        Enforced(
            "daemon/src/registry/build.rs::warmup_duration_secs_starts_endpoints_below_full_weight",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.zoneAwareLbSetting",
        Warned {
            spec: "host: a\ntrafficPolicy: {loadBalancer: {zoneAwareLbSetting: {enabled: true}}}",
            warning: "zoneAwareLbSetting",
        },
    ),
    // connectionPool.
    (
        "DestinationRule.trafficPolicy.connectionPool.tcp.maxConnections",
        Enforced(
            "tests/tests/privileged.rs::tcp_max_connections_closes_overflow_at_once_like_envoy",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.tcp.connectTimeout",
        Enforced("tests/tests/l7.rs::http_connect_timeout_is_the_clusters"),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.tcp.tcpKeepalive",
        Enforced(
            "tests/tests/privileged.rs::tcp_keepalive_time_interval_and_probes_close_a_dead_upstream",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.tcp.idleTimeout",
        Enforced(
            "tests/tests/privileged.rs::tcp_keepalive_and_idle_timeout_apply_to_proxied_connections",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
        Enforced(
            "tests/tests/privileged.rs::max_connection_duration_closes_a_busy_proxied_connection",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
        Enforced("tests/tests/l7.rs::walkthrough_scenario3_pool_limits_overflow_with_503"),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.http2MaxRequests",
        Enforced("daemon/src/breakers.rs::max_requests_is_not_queued_and_defaults_are_unlimited"),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
        Enforced("tests/tests/l7.rs::max_requests_per_connection_retires_upstream_connections"),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.maxRetries",
        Enforced("tests/tests/l7.rs::max_retries_caps_concurrent_retries_across_the_cluster"),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.idleTimeout",
        Enforced("tests/tests/l7.rs::http_idle_timeout_closes_idle_upstream_connections"),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.maxConcurrentStreams",
        Enforced(
            "tests/tests/l7.rs::max_concurrent_streams_spreads_http2_requests_over_connections",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.h2UpgradePolicy",
        Enforced(
            "tests/tests/l7.rs::h2_upgrade_policy_and_use_client_protocol_pick_the_upstream_protocol",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.useClientProtocol",
        Enforced(
            "tests/tests/l7.rs::h2_upgrade_policy_and_use_client_protocol_pick_the_upstream_protocol",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.connectionPool.http.http2KeepAlive",
        Enforced(
            "daemon/src/app/tests.rs::http2_keepalive_closes_a_connection_whose_peer_stops_answering",
        ),
    ),
    // outlierDetection.
    (
        "DestinationRule.trafficPolicy.outlierDetection",
        Enforced("tests/tests/l7.rs::outlier_detection_ejects_after_n_errors_and_backs_off"),
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.consecutiveErrors",
        Warned {
            spec: "host: a\ntrafficPolicy: {outlierDetection: {consecutiveErrors: 3}}",
            warning: "consecutiveErrors",
        },
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.consecutiveGatewayErrors",
        Enforced(
            "tests/tests/l7.rs::gateway_errors_eject_on_their_own_counter_and_500_only_counts_as_5xx",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        Enforced(
            "tests/tests/l7.rs::default_retries_hide_a_refusing_endpoint_which_is_still_ejected",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
        Enforced(
            "tests/tests/l7.rs::default_retries_hide_a_refusing_endpoint_which_is_still_ejected",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.maxEjectionPercent",
        Enforced("tests/tests/l7.rs::max_ejection_percent_holds_with_four_bad_endpoints_of_five"),
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.minHealthPercent",
        Enforced("tests/tests/l7.rs::min_health_percent_panic_balances_across_all_endpoints"),
    ),
    (
        "DestinationRule.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes",
        Enforced("tests/tests/l7.rs::listed_outlier_error_codes_eject_on_those_codes_only"),
    ),
    // tls.
    (
        "DestinationRule.trafficPolicy.tls",
        Enforced("tests/tests/tls.rs::simple_origination_verifies_ca_san_expiry_and_sends_sni"),
    ),
    (
        "DestinationRule.trafficPolicy.tls.clientCertificate",
        Enforced(
            "tests/tests/tls.rs::mutual_presents_the_client_certificate_and_simple_is_refused_by_that_server",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.tls.privateKey",
        Enforced(
            "tests/tests/tls.rs::mutual_presents_the_client_certificate_and_simple_is_refused_by_that_server",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.tls.credentialName",
        Enforced(
            "tests/tests/tls.rs::disable_is_plaintext_and_credential_name_reads_the_credentials_dir",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.tls.caCrl",
        Enforced("tests/tests/tls.rs::ca_crl_rejects_a_revoked_server_certificate"),
    ),
    // Not built.
    (
        "DestinationRule.trafficPolicy.tunnel",
        Enforced(
            "tests/tests/privileged.rs::tunnel_connect_reaches_the_target_through_the_endpoint",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.proxyProtocol",
        Enforced(
            "tests/tests/privileged.rs::proxy_protocol_header_precedes_the_clients_bytes_upstream",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.retryBudget",
        Enforced(
            "daemon/src/breakers.rs::retries_in_flight_are_capped_by_max_retries_or_the_budget",
        ),
    ),
    (
        "DestinationRule.trafficPolicy.retryBudget.budgetInterval",
        Warned {
            spec: "host: a\ntrafficPolicy: {retryBudget: {percent: 20, budgetInterval: 10s}}",
            warning: "budgetInterval",
        },
    ),
    // VirtualService.
    (
        "VirtualService.hosts",
        Enforced("tests/tests/l7.rs::walkthrough_scenario1_splits_50_50_across_subsets"),
    ),
    (
        "VirtualService.exportTo",
        Enforced(
            "daemon/src/registry/resolve/tests.rs::export_to_hides_rules_from_other_namespaces",
        ),
    ),
    (
        "VirtualService.gateways",
        Enforced(
            "daemon/src/registry/build.rs::virtual_services_bound_to_gateways_only_do_not_route_the_mesh",
        ),
    ),
    (
        "VirtualService.http[].name",
        Inert("a route's name is for logs and stats; drover's access log and explain show it"),
    ),
    (
        "VirtualService.http[].match",
        Enforced(
            "daemon/src/registry/route.rs::first_matching_http_route_wins_with_every_condition_anded",
        ),
    ),
    (
        "VirtualService.http[].match[].name",
        Inert("a match's name only prefixes Envoy's route name"),
    ),
    (
        "VirtualService.http[].match[].gateways",
        Warned {
            spec: "hosts: [a]\nhttp: [{match: [{gateways: [mesh]}], route: [{destination: {host: a}}]}]",
            warning: "gateways",
        },
    ),
    (
        "VirtualService.http[].match[].statPrefix",
        Warned {
            spec: "hosts: [a]\nhttp: [{match: [{statPrefix: x}], route: [{destination: {host: a}}]}]",
            warning: "statPrefix",
        },
    ),
    (
        "VirtualService.http[].route",
        Enforced("tests/tests/l7.rs::canary_90_10_and_transparency"),
    ),
    (
        "VirtualService.http[].route[].headers",
        Enforced(
            "tests/tests/l7.rs::route_actions_rewrite_headers_redirect_direct_response_and_fault",
        ),
    ),
    (
        "VirtualService.http[].timeout",
        Enforced("tests/tests/l7.rs::retry_on_per_try_timeout_and_route_timeout"),
    ),
    (
        "VirtualService.http[].retries",
        Enforced("tests/tests/l7.rs::retry_on_per_try_timeout_and_route_timeout"),
    ),
    (
        "VirtualService.http[].retries.backoff",
        Enforced("daemon/src/proxy/retry.rs::backoff_is_jittered_exponential_and_capped"),
    ),
    (
        "VirtualService.http[].retries.retryIgnorePreviousHosts",
        Enforced(
            "daemon/src/registry/route.rs::retries_avoid_tried_endpoints_unless_retry_ignore_previous_hosts_is_false",
        ),
    ),
    (
        "VirtualService.http[].retries.retryRemoteLocalities",
        Warned {
            spec: "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], retries: {attempts: 1, retryRemoteLocalities: true}}]",
            warning: "retryRemoteLocalities",
        },
    ),
    (
        "VirtualService.http[].corsPolicy",
        Enforced(
            "tests/tests/l7.rs::cors_preflights_are_answered_and_allowed_origins_see_their_headers",
        ),
    ),
    (
        "VirtualService.http[].corsPolicy.allowOrigin",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::a_routes_deprecated_allow_origin_list_admits_exactly_those_origins",
        ),
    ),
    (
        "VirtualService.http[].delegate",
        Warned {
            spec: "hosts: [a]\nhttp: [{delegate: {name: b}}]",
            warning: "delegate",
        },
    ),
    (
        "VirtualService.http[].directResponse",
        Enforced(
            "tests/tests/l7.rs::route_actions_rewrite_headers_redirect_direct_response_and_fault",
        ),
    ),
    (
        "VirtualService.http[].fault",
        Enforced(
            "tests/tests/l7.rs::route_actions_rewrite_headers_redirect_direct_response_and_fault",
        ),
    ),
    (
        "VirtualService.http[].fault.abort.grpcStatus",
        Enforced("daemon/src/app/tests.rs::grpc_fault_abort_is_a_trailers_only_reply"),
    ),
    (
        "VirtualService.http[].fault.delay.percent",
        Enforced("daemon/src/config/validate/tests.rs::virtual_service_rules"),
    ),
    (
        "VirtualService.http[].fault.delay.exponentialDelay",
        Rejected {
            spec: "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {delay: {exponentialDelay: 1s}}}]",
            error: "exponentialDelay",
        },
    ),
    (
        "VirtualService.http[].fault.abort.http2Error",
        Rejected {
            spec: "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {abort: {http2Error: x}}}]",
            error: "http2Error",
        },
    ),
    (
        "VirtualService.http[].headers",
        Enforced(
            "tests/tests/l7.rs::route_actions_rewrite_headers_redirect_direct_response_and_fault",
        ),
    ),
    (
        "VirtualService.http[].mirror",
        Enforced(
            "tests/tests/l7.rs::mirrors_copy_requests_to_their_subset_and_the_client_sees_only_the_route",
        ),
    ),
    (
        "VirtualService.http[].mirrors",
        Enforced(
            "tests/tests/l7.rs::mirrors_copy_requests_to_their_subset_and_the_client_sees_only_the_route",
        ),
    ),
    (
        "VirtualService.http[].mirrorPercent",
        Enforced("daemon/src/config/validate/tests.rs::virtual_service_rules"),
    ),
    (
        "VirtualService.http[].mirrorPercentage",
        Enforced("daemon/src/config/validate/tests.rs::virtual_service_rules"),
    ),
    (
        "VirtualService.http[].redirect",
        Enforced(
            "tests/tests/l7.rs::route_actions_rewrite_headers_redirect_direct_response_and_fault",
        ),
    ),
    (
        "VirtualService.http[].redirect.derivePort",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::redirects_direct_responses_and_origin_patterns_from_built_routes",
        ),
    ),
    (
        "VirtualService.http[].redirect.port",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::redirect_location_replaces_only_what_it_names",
        ),
    ),
    (
        "VirtualService.http[].rewrite",
        Enforced(
            "tests/tests/l7.rs::route_actions_rewrite_headers_redirect_direct_response_and_fault",
        ),
    ),
    (
        "VirtualService.http[].rewrite.uriRegexRewrite",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::uri_rewrite_replaces_what_the_match_matched_and_keeps_the_query",
        ),
    ),
    (
        "VirtualService.tcp",
        Enforced(
            "tests/tests/privileged.rs::hot_reload_swaps_valid_config_and_keeps_serving_on_invalid",
        ),
    ),
    (
        "VirtualService.tcp[].match[].gateways",
        Warned {
            spec: "hosts: [a]\ntcp: [{match: [{gateways: [mesh]}], route: [{destination: {host: a}}]}]",
            warning: "gateways",
        },
    ),
    (
        "VirtualService.tcp[].match[].sniHosts",
        Warned {
            spec: "hosts: [a]\ntcp: [{match: [{sniHosts: [a]}], route: [{destination: {host: a}}]}]",
            warning: "sniHosts",
        },
    ),
    (
        "VirtualService.tls",
        Enforced(
            "tests/tests/tls.rs::tls_routes_pick_the_destination_by_the_client_hellos_server_name",
        ),
    ),
    (
        "VirtualService.tls[].match",
        Enforced("daemon/src/registry/route.rs::tls_routes_match_sni_then_fall_back_to_tcp_routes"),
    ),
    (
        "VirtualService.tls[].match[].gateways",
        Warned {
            spec: "hosts: [a]\ntls: [{match: [{sniHosts: [a], gateways: [mesh]}], route: [{destination: {host: a}}]}]",
            warning: "gateways",
        },
    ),
    // ServiceEntry and WorkloadEntry.
    (
        "ServiceEntry.hosts",
        Enforced("tests/tests/l7.rs::walkthrough_scenario1_splits_50_50_across_subsets"),
    ),
    (
        "ServiceEntry.addresses",
        Enforced(
            "tests/tests/privileged.rs::netns_capture_relays_round_robin_and_keeps_vip_as_peer",
        ),
    ),
    (
        "ServiceEntry.ports",
        Enforced(
            "tests/tests/privileged.rs::netns_capture_relays_round_robin_and_keeps_vip_as_peer",
        ),
    ),
    (
        "ServiceEntry.resolution",
        Enforced("daemon/src/registry/build.rs::resolution_none_passes_through_with_target_port"),
    ),
    (
        "ServiceEntry.workloadSelector",
        Enforced("daemon/src/registry/build.rs::selects_workload_entries_and_resolves_ports"),
    ),
    (
        "ServiceEntry.exportTo",
        Enforced("daemon/src/registry/build.rs::client_identity_from_workload_entry_and_export_to"),
    ),
    (
        "ServiceEntry.subjectAltNames",
        Warned {
            spec: "hosts: [a.b]\nports: [{number: 80, name: tcp}]\nsubjectAltNames: [spiffe://x/ns/y/sa/z]",
            warning: "subjectAltNames",
        },
    ),
    (
        "ServiceEntry.location",
        Inert(
            "in Envoy it only decides auto mTLS (not built: see the README) and telemetry labels",
        ),
    ),
    (
        "WorkloadEntry.address",
        Enforced(
            "daemon/src/registry/build.rs::workload_entry_weights_shape_round_robin_and_random_picks",
        ),
    ),
    (
        "WorkloadEntry.labels",
        Enforced("tests/tests/l7.rs::walkthrough_scenario1_splits_50_50_across_subsets"),
    ),
    (
        "WorkloadEntry.ports",
        Enforced(
            "tests/tests/l7.rs::default_retries_hide_a_refusing_endpoint_which_is_still_ejected",
        ),
    ),
    (
        "WorkloadEntry.weight",
        Enforced(
            "daemon/src/registry/build.rs::workload_entry_weights_shape_round_robin_and_random_picks",
        ),
    ),
    (
        "WorkloadEntry.locality",
        Enforced(
            "tests/tests/l7.rs::locality_keeps_traffic_local_and_fails_over_in_priority_order",
        ),
    ),
    (
        "WorkloadEntry.serviceAccount",
        Enforced(
            "tests/tests/tls.rs::istio_mutual_with_the_mesh_ca_presents_and_checks_spiffe_identities",
        ),
    ),
    (
        "WorkloadEntry.network",
        Warned {
            spec: "address: 198.18.0.9\nnetwork: net2",
            warning: "network",
        },
    ),
    // PeerAuthentication.
    (
        "PeerAuthentication",
        Enforced(
            "tests/tests/tls.rs::peer_authentication_resources_set_the_inbound_mode_per_port_and_follow_edits",
        ),
    ),
    // AuthorizationPolicy.
    (
        "AuthorizationPolicy.selector",
        Enforced(
            "daemon/src/authz/tests.rs::allow_by_principal_admits_only_that_peer_and_no_plaintext",
        ),
    ),
    (
        "AuthorizationPolicy.targetRef",
        Enforced("daemon/src/authz/tests.rs::target_refs_apply_to_the_services_endpoints_only"),
    ),
    (
        "AuthorizationPolicy.targetRefs",
        Enforced("daemon/src/authz/tests.rs::target_refs_apply_to_the_services_endpoints_only"),
    ),
    (
        "AuthorizationPolicy.action",
        Enforced(
            "tests/tests/authz.rs::authorization_policies_decide_per_peer_port_and_request_on_the_pods_inbound_side",
        ),
    ),
    (
        "AuthorizationPolicy.rules",
        Enforced(
            "tests/tests/authz.rs::authorization_policies_decide_per_peer_port_and_request_on_the_pods_inbound_side",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.notPrincipals",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.notNamespaces",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.serviceAccounts",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.notServiceAccounts",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.notIpBlocks",
        Enforced("daemon/src/authz/tests.rs::ports_ip_blocks_and_when_conditions"),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.remoteIpBlocks",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.notRemoteIpBlocks",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].to[].operation.hosts",
        Enforced("daemon/src/authz/tests.rs::http_rules_match_method_path_host_and_headers"),
    ),
    (
        "AuthorizationPolicy.rules[].to[].operation.notHosts",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].to[].operation.notMethods",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].to[].operation.notPaths",
        Enforced(
            "daemon/src/authz/tests.rs::negated_forms_remote_addresses_sni_and_service_accounts_decide",
        ),
    ),
    (
        "AuthorizationPolicy.rules[].when",
        Enforced("daemon/src/authz/tests.rs::ports_ip_blocks_and_when_conditions"),
    ),
    (
        "AuthorizationPolicy.provider",
        Rejected {
            spec: "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{}]",
            error: "spec.action",
        },
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.requestPrincipals",
        Rejected {
            spec: "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]",
            error: "requestPrincipals",
        },
    ),
    (
        "AuthorizationPolicy.rules[].from[].source.notRequestPrincipals",
        Rejected {
            spec: "rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]",
            error: "notRequestPrincipals",
        },
    ),
    (
        "DestinationRule.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes",
        Enforced(
            "daemon/src/registry/route.rs::a_missing_cookie_with_ttl_is_generated_and_then_sticks",
        ),
    ),
    (
        "VirtualService.http[].redirect.scheme",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::redirects_direct_responses_and_origin_patterns_from_built_routes",
        ),
    ),
    (
        "VirtualService.http[].directResponse.body.bytes",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::redirects_direct_responses_and_origin_patterns_from_built_routes",
        ),
    ),
    (
        "VirtualService.http[].corsPolicy.allowOrigins[].regex",
        Enforced(
            "daemon/src/proxy/actions/tests.rs::redirects_direct_responses_and_origin_patterns_from_built_routes",
        ),
    ),
    // Routes that hold for some sources, destinations, ports and paths only.
    (
        "VirtualService.http[].match[].ignoreUriCase",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.http[].match[].sourceLabels",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.http[].match[].sourceNamespace",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.http[].mirror.port",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.http[].mirrors[].destination.port",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.http[].route[].destination.port",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tcp[].match[].destinationSubnets",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tcp[].match[].port",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tcp[].match[].sourceLabels",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tcp[].match[].sourceNamespace",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tls[].match[].destinationSubnets",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tls[].match[].sourceLabels",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tls[].match[].sourceNamespace",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    (
        "VirtualService.tls[].route[].weight",
        Enforced(
            "daemon/src/registry/route.rs::routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case",
        ),
    ),
    // Gateway API mesh routes.
    (
        "HTTPRoute.parentRefs",
        Enforced(
            "tests/tests/gateway.rs::mesh_ports_and_frontend_bind_the_service_address_and_port",
        ),
    ),
    (
        "HTTPRoute.parentRefs[].namespace",
        Enforced("tests/tests/gateway.rs::mesh_consumer_route_applies_to_its_namespace_only"),
    ),
    (
        "HTTPRoute.parentRefs[].sectionName",
        Warned {
            spec: "parentRefs: [{group: '', kind: Service, name: a, sectionName: http}]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            warning: "sectionName",
        },
    ),
    (
        "HTTPRoute.hostnames",
        Warned {
            spec: "parentRefs: [{group: '', kind: Service, name: a}]\nhostnames: [a.example]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            warning: "hostnames",
        },
    ),
    (
        "HTTPRoute.rules[].name",
        Inert("a label in logs and explain; it changes no routing"),
    ),
    (
        "HTTPRoute.rules[].sessionPersistence",
        Warned {
            spec: "rules: [{sessionPersistence: {sessionName: s}, backendRefs: [{name: a, port: 80}]}]",
            warning: "sessionPersistence",
        },
    ),
    (
        "HTTPRoute.rules[].backendRefs",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].backendRefs[].group",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::zero_weights_no_backends_and_unknown_services_answer_500",
        ),
    ),
    (
        "HTTPRoute.rules[].backendRefs[].kind",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::zero_weights_no_backends_and_unknown_services_answer_500",
        ),
    ),
    (
        "HTTPRoute.rules[].backendRefs[].namespace",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::a_reference_grant_opens_a_backend_in_another_namespace",
        ),
    ),
    (
        "HTTPRoute.rules[].backendRefs[].weight",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].backendRefs[].filters",
        Warned {
            spec: "rules: [{backendRefs: [{name: a, port: 80, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b, port: 80}}}]}]}]",
            warning: "filters",
        },
    ),
    (
        "HTTPRoute.rules[].backendRefs[].filters[].requestHeaderModifier",
        Enforced(
            "tests/tests/gateway.rs::mesh_matching_header_modifiers_redirects_and_named_rules",
        ),
    ),
    (
        "HTTPRoute.rules[].backendRefs[].filters[].responseHeaderModifier",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "HTTPRoute.rules[].filters",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].requestHeaderModifier",
        Enforced(
            "tests/tests/gateway.rs::mesh_matching_header_modifiers_redirects_and_named_rules",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].responseHeaderModifier",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].requestMirror",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].requestRedirect",
        Enforced(
            "tests/tests/gateway.rs::mesh_matching_header_modifiers_redirects_and_named_rules",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].requestRedirect.port",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].urlRewrite",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].filters[].extensionRef",
        Rejected {
            spec: "rules: [{filters: [{type: ExtensionRef}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "HTTPRoute.rules[].filters[].cors",
        Rejected {
            spec: "rules: [{filters: [{type: CORS}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "HTTPRoute.rules[].filters[].externalAuth",
        Rejected {
            spec: "rules: [{filters: [{type: ExternalAuth}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "HTTPRoute.rules[].matches",
        Enforced(
            "tests/tests/gateway.rs::mesh_matching_header_modifiers_redirects_and_named_rules",
        ),
    ),
    (
        "GRPCRoute.parentRefs",
        Enforced("tests/tests/gateway.rs::mesh_grpc_routes_weight_header_modifier_and_mirror"),
    ),
    (
        "GRPCRoute.parentRefs[].namespace",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.parentRefs[].sectionName",
        Warned {
            spec: "parentRefs: [{group: '', kind: Service, name: a, sectionName: http}]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            warning: "sectionName",
        },
    ),
    (
        "GRPCRoute.hostnames",
        Warned {
            spec: "parentRefs: [{group: '', kind: Service, name: a}]\nhostnames: [a.example]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            warning: "hostnames",
        },
    ),
    (
        "GRPCRoute.rules[].name",
        Inert("a label in logs and explain; it changes no routing"),
    ),
    (
        "GRPCRoute.rules[].sessionPersistence",
        Warned {
            spec: "rules: [{sessionPersistence: {sessionName: s}, backendRefs: [{name: a, port: 80}]}]",
            warning: "sessionPersistence",
        },
    ),
    (
        "GRPCRoute.rules[].backendRefs",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].backendRefs[].group",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].backendRefs[].kind",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].backendRefs[].namespace",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].backendRefs[].weight",
        Enforced("tests/tests/gateway.rs::mesh_grpc_routes_weight_header_modifier_and_mirror"),
    ),
    (
        "GRPCRoute.rules[].backendRefs[].filters",
        Warned {
            spec: "rules: [{backendRefs: [{name: a, port: 80, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b, port: 80}}}]}]}]",
            warning: "filters",
        },
    ),
    (
        "GRPCRoute.rules[].backendRefs[].filters[].requestHeaderModifier",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].backendRefs[].filters[].responseHeaderModifier",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].filters",
        Enforced("tests/tests/gateway.rs::mesh_grpc_routes_weight_header_modifier_and_mirror"),
    ),
    (
        "GRPCRoute.rules[].filters[].requestHeaderModifier",
        Enforced("tests/tests/gateway.rs::mesh_grpc_routes_weight_header_modifier_and_mirror"),
    ),
    (
        "GRPCRoute.rules[].filters[].responseHeaderModifier",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].filters[].requestMirror",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "GRPCRoute.rules[].filters[].requestRedirect",
        Rejected {
            spec: "rules: [{filters: [{type: RequestRedirect, requestRedirect: {hostname: b.example}}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "GRPCRoute.rules[].filters[].urlRewrite",
        Rejected {
            spec: "rules: [{filters: [{type: URLRewrite, urlRewrite: {hostname: b.example}}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "GRPCRoute.rules[].filters[].extensionRef",
        Rejected {
            spec: "rules: [{filters: [{type: ExtensionRef}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "GRPCRoute.rules[].filters[].cors",
        Rejected {
            spec: "rules: [{filters: [{type: CORS}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "GRPCRoute.rules[].filters[].externalAuth",
        Rejected {
            spec: "rules: [{filters: [{type: ExternalAuth}], backendRefs: [{name: a, port: 80}]}]",
            error: "filters[0].type",
        },
    ),
    (
        "GRPCRoute.rules[].matches",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "HTTPRoute.rules[].matches[].method",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::precedence_orders_matches_across_routes_as_the_spec_says",
        ),
    ),
    (
        "HTTPRoute.rules[].matches[].queryParams",
        Enforced(
            "tests/tests/gateway.rs::mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon",
        ),
    ),
    (
        "HTTPRoute.rules[].timeouts",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "HTTPRoute.rules[].retry",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "TCPRoute.parentRefs",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "TCPRoute.parentRefs[].sectionName",
        Warned {
            spec: "parentRefs: [{group: '', kind: Service, name: a, sectionName: tcp}]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            warning: "sectionName",
        },
    ),
    (
        "TCPRoute.rules",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes",
        ),
    ),
    (
        "TCPRoute.rules[].name",
        Inert("a label in logs and explain; it changes no routing"),
    ),
    (
        "ReferenceGrant",
        Enforced(
            "daemon/src/registry/mesh_routes/tests.rs::a_reference_grant_opens_a_backend_in_another_namespace",
        ),
    ),
    // Telemetry.
    (
        "Telemetry.selector",
        Enforced(
            "daemon/src/telemetry/tests.rs::telemetry_composes_mesh_then_namespace_then_workload",
        ),
    ),
    (
        "Telemetry.targetRef",
        Warned {
            spec: "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}",
            warning: "spec.targetRef",
        },
    ),
    (
        "Telemetry.targetRefs",
        Warned {
            spec: "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]",
            warning: "spec.targetRefs",
        },
    ),
    (
        "Telemetry.tracing[].randomSamplingPercentage",
        Enforced(
            "tests/tests/telemetry.rs::a_telemetry_resource_samples_tags_filters_the_log_and_overrides_metrics",
        ),
    ),
    (
        "Telemetry.tracing[].customTags",
        Enforced(
            "tests/tests/telemetry.rs::a_telemetry_resource_samples_tags_filters_the_log_and_overrides_metrics",
        ),
    ),
    (
        "Telemetry.tracing[].disableSpanReporting",
        Enforced(
            "daemon/src/telemetry/tests.rs::telemetry_composes_mesh_then_namespace_then_workload",
        ),
    ),
    (
        "Telemetry.tracing[].match.mode",
        Warned {
            spec: "tracing: [{match: {mode: SERVER}}]",
            warning: "spec.tracing[0].match.mode",
        },
    ),
    (
        "Telemetry.tracing[].providers",
        Warned {
            spec: "tracing: [{providers: [{name: zipkin}]}]",
            warning: "spec.tracing[0].providers[0].name",
        },
    ),
    (
        "Telemetry.tracing[].useRequestIdForTraceSampling",
        Warned {
            spec: "tracing: [{useRequestIdForTraceSampling: true}]",
            warning: "spec.tracing[0].useRequestIdForTraceSampling",
        },
    ),
    (
        "Telemetry.tracing[].enableIstioTags",
        Warned {
            spec: "tracing: [{enableIstioTags: true}]",
            warning: "spec.tracing[0].enableIstioTags",
        },
    ),
    (
        "Telemetry.metrics[].providers",
        Warned {
            spec: "metrics: [{providers: [{name: stackdriver}]}]",
            warning: "spec.metrics[0].providers[0].name",
        },
    ),
    (
        "Telemetry.metrics[].reportingInterval",
        Enforced(
            "tests/tests/telemetry.rs::a_long_tcp_connection_is_reported_every_reporting_interval_while_it_runs",
        ),
    ),
    (
        "Telemetry.metrics[].overrides",
        Enforced(
            "tests/tests/telemetry.rs::a_telemetry_resource_samples_tags_filters_the_log_and_overrides_metrics",
        ),
    ),
    (
        "Telemetry.metrics[].overrides[].match.mode",
        Enforced(
            "daemon/src/telemetry/tests.rs::metric_overrides_disable_families_remove_tags_and_upsert_values",
        ),
    ),
    (
        "Telemetry.metrics[].overrides[].tagOverrides",
        Enforced(
            "daemon/src/telemetry/tests.rs::metric_overrides_disable_families_remove_tags_and_upsert_values",
        ),
    ),
    (
        "Telemetry.metrics[].overrides[].match.customMetric",
        Warned {
            spec: "metrics: [{overrides: [{match: {customMetric: my_metric}}]}]",
            warning: "spec.metrics[0].overrides[0].match.customMetric",
        },
    ),
    (
        "Telemetry.accessLogging[].disabled",
        Enforced(
            "daemon/src/telemetry/tests.rs::telemetry_composes_mesh_then_namespace_then_workload",
        ),
    ),
    (
        "Telemetry.accessLogging[].filter",
        Enforced(
            "tests/tests/telemetry.rs::a_telemetry_resource_samples_tags_filters_the_log_and_overrides_metrics",
        ),
    ),
    (
        "Telemetry.accessLogging[].match.mode",
        Warned {
            spec: "accessLogging: [{match: {mode: SERVER}}]",
            warning: "spec.accessLogging[0].match.mode",
        },
    ),
    (
        "Telemetry.accessLogging[].providers",
        Warned {
            spec: "accessLogging: [{providers: [{name: otel}]}]",
            warning: "spec.accessLogging[0].providers[0].name",
        },
    ),
];

/// Every field of the mirror, by kind, with shared blocks folded onto one spelling.
fn mirror_fields() -> BTreeSet<String> {
    use super::crd;
    let kinds = [
        (
            "DestinationRule",
            trace::fields::<crd::DestinationRuleSpec>(),
        ),
        ("VirtualService", trace::fields::<crd::VirtualServiceSpec>()),
        ("ServiceEntry", trace::fields::<crd::ServiceEntrySpec>()),
        ("WorkloadEntry", trace::fields::<crd::WorkloadEntrySpec>()),
        (
            "PeerAuthentication",
            trace::fields::<crd::PeerAuthenticationSpec>(),
        ),
        (
            "AuthorizationPolicy",
            trace::fields::<crd::AuthorizationPolicySpec>(),
        ),
        ("HTTPRoute", trace::fields::<crd::gateway::HttpRouteSpec>()),
        ("GRPCRoute", trace::fields::<crd::gateway::GrpcRouteSpec>()),
        ("TCPRoute", trace::fields::<crd::gateway::TcpRouteSpec>()),
        (
            "ReferenceGrant",
            trace::fields::<crd::gateway::ReferenceGrantSpec>(),
        ),
        (
            "Telemetry",
            trace::fields::<crd::telemetry::TelemetrySpec>(),
        ),
    ];
    let mut out = BTreeSet::new();
    for (kind, fields) in kinds {
        for f in fields {
            let f = f.replace("subsets[].trafficPolicy", "trafficPolicy");
            let f = match f.split_once("trafficPolicy.portLevelSettings[].") {
                Some((head, tail)) if !tail.starts_with("port.") => {
                    format!("{head}trafficPolicy.{tail}")
                }
                _ => f,
            };
            match f.strip_prefix("endpoints[].") {
                Some(rest) if kind == "ServiceEntry" => out.insert(format!("WorkloadEntry.{rest}")),
                _ => out.insert(format!("{kind}.{f}")),
            };
        }
    }
    // A derived endpoint's provenance: written by drover, never read from YAML.
    out.remove("WorkloadEntry.origin");
    out
}

/// The longest table prefix that covers `field` (at a segment boundary).
fn entry(field: &str) -> Option<&'static (&'static str, How)> {
    TABLE
        .iter()
        .filter(|(p, _)| {
            field == *p
                || field
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
        .max_by_key(|(p, _)| p.len())
}

/// The name a test that sets `field` must mention: its last segment (`consistentHash.maglev`
/// → `maglev`), or for an entry of a map (`labels.*`) the map's.
fn field_name(field: &str) -> String {
    let field = field.strip_suffix(".*").unwrap_or(field);
    let last = field.rsplit('.').next().unwrap_or(field);
    last.trim_end_matches("[]").to_string()
}

/// `httpErrorCodes` → `http_error_codes`: how a unit test over the validated policy names it.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The body of `fn function` in `text` (up to the closing brace at its indentation).
fn body<'t>(text: &'t str, function: &str) -> Option<&'t str> {
    let start = text.find(&format!("fn {function}("))?;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let indent = &text[line_start..start];
    let indent = &indent[..indent.len() - indent.trim_start().len()];
    let close = format!("\n{indent}}}\n");
    let end = (text[start..].find(&close)).map_or(text.len(), |e| start + e + close.len());
    Some(&text[start..end])
}

/// The definition of `const name` in `text` (up to its `;` at the end of a line).
fn constant<'t>(text: &'t str, name: &str) -> Option<&'t str> {
    let start = text.find(&format!("const {name}:"))?;
    let end = (text[start..].find(";\n")).map_or(text.len(), |e| start + e);
    Some(&text[start..end])
}

/// Files whose helpers tests build their configuration with.
const HELPERS: [&str; 2] = ["tests/src/lib.rs", "daemon/src/testing.rs"];

/// What a test is made of: its body, the bodies of the functions it calls (in its file or the
/// shared helpers, two levels deep), and the fixture files they name (`….yaml` under
/// `tests/fixtures`).
fn test_source(root: &std::path::Path, text: &str, function: &str) -> Option<String> {
    let mut out = body(text, function)?.to_string();
    let helpers: Vec<String> = (HELPERS.iter())
        .map(|h| std::fs::read_to_string(root.join(h)).unwrap_or_default())
        .collect();
    let mut seen = BTreeSet::from([function.to_string()]);
    for _ in 0..2 {
        let called: Vec<String> = (out
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '(')))
        .filter_map(|t| t.strip_suffix('('))
        .map(str::to_string)
        .filter(|name| !name.is_empty() && !seen.contains(name))
        .collect();
        let constants: Vec<String> = (out.split(|c: char| !(c.is_alphanumeric() || c == '_')))
            .filter(|t| {
                t.len() > 1
                    && (t.chars()).all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
            .map(str::to_string)
            .filter(|name| !seen.contains(name))
            .collect();
        for name in called {
            let found = std::iter::once(text)
                .chain(helpers.iter().map(String::as_str))
                .find_map(|t| body(t, &name));
            if let Some(b) = found {
                out.push_str(b);
            }
            seen.insert(name);
        }
        for name in constants {
            let found = std::iter::once(text)
                .chain(helpers.iter().map(String::as_str))
                .find_map(|t| constant(t, &name));
            if let Some(c) = found {
                out.push_str(c);
            }
            seen.insert(name);
        }
    }
    let named: BTreeSet<String> = (out.split(|c: char| c == '"' || c == '/' || c.is_whitespace()))
        .filter(|s| s.ends_with(".yaml"))
        .map(str::to_string)
        .collect();
    let fixtures = root.join("tests/fixtures");
    let mut dirs = vec![fixtures];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                dirs.push(path);
            } else if named.contains(&name) {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    Some(out)
}

#[test]
fn every_field_of_the_mirror_is_enforced_warned_or_inert() {
    let fields = mirror_fields();
    assert!(fields.len() > 150, "the tracer found only {}", fields.len());
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for f in &fields {
        let Some((prefix, how)) = entry(f) else {
            problems.push(format!("{f}: neither enforced nor warned about"));
            continue;
        };
        used.insert(*prefix);
        match how {
            Enforced(test) => {
                let (file, function) = test.split_once("::").expect("file::function");
                let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
                let name = field_name(f);
                match test_source(&root, &text, function) {
                    None => problems.push(format!("{f}: no test {function} in {file}")),
                    Some(source)
                        if !source.contains(&name) && !source.contains(&snake_case(&name)) =>
                    {
                        problems.push(format!(
                            "{f}: test {function} ({file}) never sets {name:?}: neither its body, the functions and constants it uses nor the fixtures they name mention it (nor the validated policy's {:?})",
                            snake_case(&name)
                        ))
                    }
                    Some(_) => {}
                }
            }
            Warned { spec, warning } => {
                let kind = f.split('.').next().unwrap_or_default();
                let (errors, warnings) = super::validate::tests::check(kind, spec);
                let located = warnings.iter().any(|w| {
                    w.split(": ")
                        .next()
                        .is_some_and(|field| field.contains(warning))
                });
                if !errors.is_empty() || !located {
                    problems.push(format!(
                        "{f}: setting it warns nothing on {warning:?}: errors {errors:?}, warnings {warnings:?}"
                    ));
                }
            }
            Rejected { spec, error } => {
                let kind = f.split('.').next().unwrap_or_default();
                let (errors, _) = super::validate::tests::check(kind, spec);
                if !errors.iter().any(|e| {
                    e.split(": ")
                        .next()
                        .is_some_and(|field| field.contains(error))
                }) {
                    problems.push(format!(
                        "{f}: setting it is not refused on {error:?}: {errors:?}"
                    ));
                }
            }
            Inert("") => problems.push(format!("{f}: inert, but says not why")),
            Inert(_) => {}
        }
    }
    for (prefix, _) in TABLE {
        if !used.contains(prefix) {
            problems.push(format!(
                "{prefix}: covers no field of the mirror (stale entry)"
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
