//! The deployment files parse and are wired as documented: every denoiser the controller
//! names exists, every service exports traces to the Jaeger service's OTLP port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

fn compose() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-compose.yml");
    yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn compose_wires_jaeger_controller_and_two_denoisers() {
    let c = compose();
    let services = c["services"].as_object().unwrap();
    let jaeger = &services["jaeger"];
    assert!(
        jaeger["image"]
            .as_str()
            .unwrap()
            .starts_with("jaegertracing/")
    );
    let ports: Vec<&str> = jaeger["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(ports.contains(&"4317:4317") && ports.contains(&"16686:16686"));

    let controller = &services["cache-controller"];
    let args: Vec<&str> = controller["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "cache-controller");
    let denoisers: Vec<&str> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--denoiser="))
        .collect();
    assert_eq!(denoisers.len(), 2);
    for url in denoisers {
        let host = url.trim_start_matches("http://").split(':').next().unwrap();
        let d = &services[host];
        let d_args: Vec<&str> = d["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(d_args[0], "denoiser", "{host}");
        assert!(d_args.contains(&"--listen=0.0.0.0:50051"), "{host}");
        assert!(url.ends_with(":50051"));
    }
    for (name, s) in services.iter().filter(|(n, _)| *n != "jaeger") {
        assert_eq!(
            s["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://jaeger:4317",
            "{name}"
        );
        assert!(s["environment"]["OTEL_SERVICE_NAME"].is_string(), "{name}");
    }
}
