//! The committed CRD is the one the code generates.

#[test]
fn committed_crd_matches_the_types() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/netbirdinstance.yaml"
    ))
    .unwrap();
    assert!(
        committed == netbird_operator::crd::crd_yaml(),
        "crds/netbirdinstance.yaml is stale: run `cargo run -- crd > crds/netbirdinstance.yaml`"
    );
}

#[test]
fn crd_has_list_map_conditions_and_cel_rules() {
    let y = netbird_operator::crd::crd_yaml();
    assert!(y.contains("x-kubernetes-list-type: map"));
    assert!(y.contains("x-kubernetes-list-map-keys"));
    assert!(y.contains("duration(self) >= duration('1m')"));
    assert!(
        !y.contains("format: uint"),
        "unsigned formats make the apiserver warn"
    );
}

#[test]
fn chart_crd_matches_the_types() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/netbird-operator/templates/crds.yaml"
    ))
    .unwrap();
    assert!(
        committed == netbird_operator::crd::crd_helm_template(),
        "the chart's CRD template is stale: run `make crd`"
    );
}
