use super::*;
use crate::castore::B3Digest;
use crate::proto::build as pb;
// The seed layout is the shortest way to write a request; its decoder validates like any.
use crate::wire::seed::decode;

fn file_node(name: &str) -> castore_pb::Node {
    castore_pb::Node {
        node: Some(castore_pb::node::Node::File(castore_pb::FileNode {
            name: Bytes::copy_from_slice(name.as_bytes()),
            digest: B3Digest::of(b"x").into(),
            size: 1,
            executable: false,
        })),
    }
}

fn env(k: &str, v: &str) -> pb::build_request::EnvVar {
    pb::build_request::EnvVar {
        key: k.into(),
        value: Bytes::copy_from_slice(v.as_bytes()),
    }
}

fn seed() -> pb::BuildRequest {
    pb::BuildRequest {
        command_args: vec![
            "/nix/store/aaa-busybox/bin/sh".into(),
            "-c".into(),
            "true".into(),
        ],
        outputs: vec!["fhaj6gmwns62s6ypkcldbaj2ybvkhx3p-foo".into()],
        environment_vars: vec![env("HOME", "/homeless-shelter"), env("out", "/nix/store/x")],
        inputs: vec![file_node("aaa-busybox"), file_node("bbb-src")],
        constraints: Some(pb::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            min_memory: 0,
            available_ro_paths: vec!["/dev/kvm".into()],
        }),
    }
}

fn err_field(req: pb::BuildRequest) -> String {
    decode(req).unwrap_err().field
}

#[test]
fn seed_layout_maps_onto_the_model() {
    let r = decode(seed()).unwrap();
    assert_eq!(r.inputs_dir.as_str(), "nix/store");
    assert_eq!(r.working_dir.as_str(), "build");
    let scratch: Vec<_> = r.scratch_paths.iter().map(|p| p.as_str()).collect();
    assert_eq!(scratch, ["build", "nix/store"]);
    assert_eq!(
        r.outputs[0].as_str(),
        "nix/store/fhaj6gmwns62s6ypkcldbaj2ybvkhx3p-foo"
    );
    assert_eq!(
        r.outputs[0].file_name(),
        "fhaj6gmwns62s6ypkcldbaj2ybvkhx3p-foo"
    );
    assert_eq!(
        r.outputs[0].guest_path(),
        "/nix/store/fhaj6gmwns62s6ypkcldbaj2ybvkhx3p-foo"
    );
    assert_eq!(r.inputs.len(), 2);
    assert_eq!(r.constraints.available_ro_paths, ["/dev/kvm"]);
}

#[test]
fn an_empty_system_is_invalid_not_unsatisfiable() {
    let mut r = seed();
    r.constraints.as_mut().unwrap().system.clear();
    let e = decode(r).unwrap_err();
    assert_eq!(e.field, "constraints.system");
    assert!(e.reason.contains("empty"), "{e}");
    let mut r = seed();
    r.constraints = None;
    assert_eq!(err_field(r), "constraints.system");
}

#[test]
fn empty_command_is_rejected() {
    let mut r = seed();
    r.command_args.clear();
    assert_eq!(err_field(r), "command_args");
}

#[test]
fn nul_in_argument_is_rejected() {
    let mut r = seed();
    r.command_args[1] = "a\0b".into();
    assert_eq!(err_field(r), "command_args[1]");
}

#[test]
fn unsorted_and_duplicate_inputs_are_rejected() {
    let mut r = seed();
    r.inputs.reverse();
    assert_eq!(err_field(r), "inputs[1]");
    let mut r = seed();
    r.inputs[1] = file_node("aaa-busybox");
    let e = decode(r).unwrap_err();
    assert_eq!(e.field, "inputs[1]");
    assert!(e.reason.contains("duplicate"), "{e}");
}

#[test]
fn input_without_node_or_with_bad_name_is_rejected() {
    let mut r = seed();
    r.inputs[0] = castore_pb::Node { node: None };
    assert_eq!(err_field(r), "inputs[0]");
    let mut r = seed();
    r.inputs[0] = file_node("..");
    assert_eq!(err_field(r), "inputs[0]");
}

#[test]
fn bad_output_names_are_rejected() {
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        let mut r = seed();
        r.outputs = vec![bad.into()];
        assert_eq!(err_field(r), "outputs[0]", "output {bad:?}");
    }
}

#[test]
fn unsorted_or_duplicate_outputs_are_rejected() {
    let mut r = seed();
    r.outputs = vec!["b".into(), "a".into()];
    assert_eq!(err_field(r), "outputs[1]");
    let mut r = seed();
    r.outputs = vec!["a".into(), "a".into()];
    assert_eq!(err_field(r), "outputs[1]");
}

#[test]
fn output_naming_an_input_is_rejected() {
    let mut r = seed();
    r.outputs = vec!["bbb-src".into()];
    let e = decode(r).unwrap_err();
    assert_eq!(e.field, "outputs[0]");
    assert!(e.reason.contains("also an input"), "{e}");
}

#[test]
fn bad_environment_is_rejected() {
    let cases: [(Vec<pb::build_request::EnvVar>, &str); 4] = [
        (vec![env("b", ""), env("a", "")], "environment_vars[1]"),
        (vec![env("a", ""), env("a", "")], "environment_vars[1]"),
        (vec![env("", "x")], "environment_vars[0]"),
        (vec![env("a=b", "x")], "environment_vars[0]"),
    ];
    for (vars, field) in cases {
        let mut r = seed();
        r.environment_vars = vars;
        assert_eq!(err_field(r), field);
    }
    let mut r = seed();
    r.environment_vars = vec![pb::build_request::EnvVar {
        key: "k".into(),
        value: Bytes::from_static(b"a\0"),
    }];
    assert_eq!(err_field(r), "environment_vars[0]");
}

#[test]
fn relative_or_unclean_ro_paths_are_rejected() {
    for bad in ["dev/kvm", "/dev/../etc", "/dev//kvm", "/"] {
        let mut r = seed();
        r.constraints.as_mut().unwrap().available_ro_paths = vec![bad.into()];
        assert_eq!(err_field(r), "constraints.available_ro_paths[0]", "{bad:?}");
    }
}

#[test]
fn the_2024_model_checks_paths_and_scratch_membership() {
    let base = RawRequest {
        command_args: vec!["/bin/sh".into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec!["nix/store/x-hello".into()],
        constraints: Constraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(base.clone().validate().is_ok());

    let mut r = base.clone();
    r.refscan_needles = vec!["x".repeat(MAX_NEEDLE_BYTES + 1)];
    assert_eq!(r.validate().unwrap_err().field, "refscan_needles[0]");

    let mut r = base.clone();
    r.outputs = vec!["etc/x".into()];
    assert_eq!(r.validate().unwrap_err().field, "outputs[0]");

    for bad in ["/build", "build/", "a//b", "./a", "a/.."] {
        let mut r = base.clone();
        r.working_dir = bad.into();
        assert_eq!(r.validate().unwrap_err().field, "working_dir", "{bad:?}");
    }

    let mut r = base.clone();
    r.additional_files = vec![("b".into(), Bytes::new()), ("a".into(), Bytes::new())];
    assert_eq!(r.validate().unwrap_err().field, "additional_files[1]");

    let mut r = base;
    r.additional_files = vec![(
        "build/big".into(),
        Bytes::from(vec![0u8; MAX_ADDITIONAL_FILES_BYTES + 1]),
    )];
    assert_eq!(r.validate().unwrap_err().field, "additional_files[0]");
}

#[test]
fn relative_path_helpers() {
    let p = RelativePath::parse("nix/store/abc").unwrap();
    assert_eq!(p.parent(), Some("nix/store"));
    assert!(p.is_inside(&RelativePath::parse("nix/store").unwrap()));
    assert!(!p.is_inside(&RelativePath::parse("nix/sto").unwrap()));
    assert!(!p.is_inside(&p));
    assert_eq!(RelativePath::parse("build").unwrap().parent(), None);
}
