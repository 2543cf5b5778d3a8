//! The deployment files parse and are wired as documented: every denoiser the controller
//! names exists, every service exports traces to the Jaeger service's OTLP port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

mod k8s {
    //! Every manifest under deploy/k8s parses into typed Kubernetes objects, with no field
    //! lost on the way (a misspelt or misplaced field fails), and the objects are wired as
    //! documented: GPU denoisers with gRPC health probes behind a headless Service that the
    //! controller resolves, traces to the Jaeger Service.

    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Container, Namespace, Service};
    use serde::Deserialize as _;

    #[derive(Default)]
    struct Objects {
        deployments: BTreeMap<String, Deployment>,
        services: BTreeMap<String, Service>,
        namespaces: Vec<Namespace>,
    }

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
    }

    /// Parses `value` as `T` and checks that serialising it back gives `value` again.
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
        value: &serde_json::Value,
        file: &str,
    ) -> T {
        let t: T = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{file}: {e}\n{value:#}"));
        let back = serde_json::to_value(&t).unwrap();
        assert_eq!(
            &back, value,
            "{file}: fields were dropped or changed when parsed as a typed object"
        );
        t
    }

    fn load() -> Objects {
        let kustomization: serde_json::Value = yaml_serde::from_str(
            &std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap(),
        )
        .unwrap();
        let listed: Vec<String> = kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let mut on_disk: Vec<String> = std::fs::read_dir(dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
            .collect();
        on_disk.sort();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(
            sorted, on_disk,
            "kustomization.yaml must list every manifest"
        );

        let mut objects = Objects::default();
        for file in &listed {
            let text = std::fs::read_to_string(dir().join(file)).unwrap();
            for doc in yaml_serde::Deserializer::from_str(&text) {
                let value = serde_json::Value::deserialize(doc).unwrap();
                if value.is_null() {
                    continue;
                }
                let kind = value["kind"].as_str().unwrap_or_default().to_string();
                match kind.as_str() {
                    "Deployment" => {
                        let d: Deployment = typed(&value, file);
                        let name = d.metadata.name.clone().unwrap();
                        objects.deployments.insert(name, d);
                    }
                    "Service" => {
                        let s: Service = typed(&value, file);
                        let name = s.metadata.name.clone().unwrap();
                        objects.services.insert(name, s);
                    }
                    "Namespace" => objects.namespaces.push(typed(&value, file)),
                    other => panic!("{file}: unexpected kind {other:?}"),
                }
            }
        }
        objects
    }

    fn container(d: &Deployment) -> &Container {
        &d.spec.template.spec.as_ref().unwrap().containers[0]
    }

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    /// The Service's selector matches the Deployment's pod labels.
    fn selects(s: &Service, d: &Deployment) -> bool {
        let selector = s.spec.as_ref().unwrap().selector.as_ref().unwrap();
        let labels = d
            .spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    #[test]
    fn manifests_are_typed_kubernetes_objects_wired_together() {
        let o = load();
        assert_eq!(o.namespaces.len(), 1);
        let ns = o.namespaces[0].metadata.name.clone().unwrap();
        for (name, d) in &o.deployments {
            assert_eq!(d.metadata.namespace.as_deref(), Some(ns.as_str()), "{name}");
        }

        // Denoisers: a GPU each, gRPC probes on the Denoiser health status, headless Service.
        let denoiser = &o.deployments["denoiser"];
        let dc = container(denoiser);
        assert_eq!(dc.args.as_ref().unwrap()[0], "denoiser");
        for resources in [
            dc.resources.as_ref().unwrap().requests.as_ref().unwrap(),
            dc.resources.as_ref().unwrap().limits.as_ref().unwrap(),
        ] {
            assert_eq!(resources["nvidia.com/gpu"].0, "1");
        }
        let ready = dc.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
        assert_eq!(ready.port, 50051);
        assert_eq!(ready.service.as_deref(), Some("teaserve.v1.Denoiser"));
        assert!(dc.startup_probe.as_ref().unwrap().grpc.is_some());
        let listen = dc
            .args
            .as_ref()
            .unwrap()
            .iter()
            .find_map(|a| a.strip_prefix("--listen="))
            .unwrap();
        assert!(listen.ends_with(":50051"));
        let svc = &o.services["denoiser"];
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
        assert!(selects(svc, denoiser));
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 50051);

        // The controller resolves that headless Service.
        let controller = &o.deployments["cache-controller"];
        let cc = container(controller);
        let target = cc
            .args
            .as_ref()
            .unwrap()
            .iter()
            .find_map(|a| a.strip_prefix("--denoiser="))
            .unwrap();
        assert_eq!(
            target,
            format!("dns:///denoiser.{ns}.svc.cluster.local:50051"),
            "the controller must resolve the headless denoiser Service"
        );
        assert!(
            cc.readiness_probe
                .as_ref()
                .unwrap()
                .grpc
                .as_ref()
                .is_some_and(|g| g.port == 50050)
        );
        assert!(selects(&o.services["cache-controller"], controller));

        // Both export traces to the Jaeger Service's OTLP port.
        let jaeger = &o.services["jaeger"];
        assert!(selects(jaeger, &o.deployments["jaeger"]));
        assert!(
            jaeger
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p.port == 4317)
        );
        for d in [denoiser, controller] {
            assert_eq!(
                env(container(d), "OTEL_EXPORTER_OTLP_ENDPOINT"),
                Some(format!("http://jaeger.{ns}.svc.cluster.local:4317").as_str())
            );
        }
    }

    #[test]
    fn a_misspelt_field_is_caught() {
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "x" },
            "spec": { "clusterIp": "None" }
        });
        let parsed: Service = serde_json::from_value(value.clone()).unwrap();
        assert_ne!(serde_json::to_value(&parsed).unwrap(), value);
    }
}
