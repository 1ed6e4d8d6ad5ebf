use super::*;

fn minimal() -> &'static str {
    "[gateway]\nid = \"gw-1\"\n"
}

#[test]
fn a_minimal_config_gets_every_default() {
    let c = parse(minimal(), Path::new("t.toml")).unwrap();
    assert_eq!(
        c.store.path,
        PathBuf::from("/var/lib/hvac-edge/hvac-edge.db")
    );
    assert_eq!(c.pipeline.batch_max, 256);
}

#[test]
fn the_embedded_demo_config_parses() {
    let _: Config = toml::from_str(DEMO_TOML).unwrap();
}
