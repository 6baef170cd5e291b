//! The deployment files: `docker-compose.yml` and `deploy/compose/`, the images of
//! `deploy/docker/`, the Kubernetes manifests of `deploy/k8s/` and the Grafana dashboard of
//! `deploy/grafana/`. No container runs here: the files are validated (`docker-compose config`)
//! and checked against the workspace itself (setting names, binary names, admin ports, metric
//! families, the NATS users of `deploy/compose/nats.conf`), so that they cannot drift from the
//! code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_norway::Value as Yaml;

/// The three services, each with the workspace package (and Dockerfile) of the same name.
const SERVICES: [&str; 3] = ["ws-gateway", "pg-bridge", "pg-recorder"];

/// The NATS user of each service in `deploy/compose/nats.conf`.
const NATS_USERS: [(&str, &str); 3] = [
    ("ws-gateway", "gateway"),
    ("pg-bridge", "bridge"),
    ("pg-recorder", "recorder"),
];

fn nats_user_of(package: &str) -> &'static str {
    NATS_USERS
        .iter()
        .find(|(p, _)| *p == package)
        .map(|(_, u)| *u)
        .unwrap_or_else(|| panic!("no NATS user for {package}"))
}

/// The users of the shipped NATS configuration and the environment variable holding each
/// one's password (`{ user: gateway, password: $NATS_GATEWAY_PASSWORD, ...`).
fn nats_conf_users() -> BTreeMap<String, String> {
    let conf = read("deploy/compose/nats.conf");
    conf.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("{ user: ")?;
            let (user, rest) = rest.split_once(',')?;
            let var = rest.trim().strip_prefix("password: $")?;
            let var = var.split(|c: char| c == ',' || c.is_whitespace()).next()?;
            Some((user.trim().to_owned(), var.to_owned()))
        })
        .collect()
}

/// The `authorization { ... }` block of a configuration text, without comments and blank
/// lines (as the Kubernetes README quotes it).
fn authorization_block(conf: &str) -> Vec<String> {
    let mut block = Vec::new();
    let mut depth = 0usize;
    for line in conf.lines() {
        let code = line.trim();
        if depth == 0 && !code.starts_with("authorization {") {
            continue;
        }
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        depth += code.matches('{').count();
        depth = depth.saturating_sub(code.matches('}').count());
        block.push(code.to_owned());
        if depth == 0 {
            break;
        }
    }
    block
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One YAML document, with `<<` merge keys applied (as docker-compose does).
fn yaml(rel: &str) -> Yaml {
    let mut v: Yaml =
        serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"));
    v.apply_merge()
        .unwrap_or_else(|e| panic!("{rel}: merge keys: {e}"));
    v
}

/// Every document of a multi-document YAML file (documents separated by `---` lines).
fn yaml_docs(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v: &Yaml| !v.is_null())
        .collect()
}

fn text(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

fn mapping(v: &Yaml) -> Vec<(String, &Yaml)> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (text(k), v)).collect())
        .unwrap_or_default()
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(text).collect())
        .unwrap_or_default()
}

/// `KEY=value` lines of an env file (comments and blank lines skipped).
fn env_file(rel: &str) -> Vec<(String, String)> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: not KEY=value: {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// The setting names the stack knows (`KNOWN_KEYS` in libs/pgws-config), as `PGWS_*` names.
fn known_settings() -> BTreeSet<String> {
    pgws_config::KNOWN_KEYS.iter().map(|k| k.env()).collect()
}

fn assert_real_settings(what: &str, keys: impl IntoIterator<Item = String>) {
    let known = known_settings();
    let mut n = 0;
    for key in keys {
        n += 1;
        assert!(
            known.contains(&key),
            "{what} sets {key}, which is not a pgws setting (KNOWN_KEYS in libs/pgws-config)"
        );
    }
    assert!(n > 0, "{what} sets nothing");
}

/// The default admin port of a service.
fn admin_port(service: &str) -> u16 {
    pgws_config::AdminConfig::default_port(service)
        .unwrap_or_else(|| panic!("{service}: no default admin port in pgws-config"))
}

/// Metric names the services register (without the `pgws_` prefix the registry adds).
fn registered_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (service, registered) in [
        ("ws-gateway", ws_gateway::metric_names()),
        ("pg-bridge", pg_bridge::metric_names()),
        ("pg-recorder", pg_recorder::metric_names()),
    ] {
        assert!(!registered.is_empty(), "{service} registers no metric");
        names.extend(registered);
    }
    names
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// keywords, label names, strings, numbers, durations or Grafana variables.
fn promql_metric_names(expr: &str) -> Vec<String> {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "atan2"];
    // Aggregations may put their grouping first: `sum by (le) (...)`.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let c: Vec<char> = expr.chars().collect();
    // Index after the bracket closing the one at `i`, quotes honoured.
    let skip = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        let mut quote = None;
        while i < c.len() {
            match (quote, c[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), ch) if ch == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'' | '`') => quote = Some(c[i]),
                (None, ch) if ch == open => depth += 1,
                (None, ch) if ch == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => i = skip(i, '{', '}'),
            '[' => i = skip(i, '[', ']'),
            '$' => {
                i += 1;
                if c.get(i) == Some(&'{') {
                    i = skip(i, '{', '}');
                } else {
                    while i < c.len() && ident(c[i]) {
                        i += 1;
                    }
                }
            }
            ch if ch.is_ascii_digit() || ch == '.' => {
                while i < c.len() && (ident(c[i]) || c[i] == '.') {
                    i += 1;
                }
            }
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                let rest: String = c[j..].iter().collect();
                let grouped = AGGREGATIONS.contains(&word.as_str())
                    && (rest.starts_with("by") || rest.starts_with("without"));
                let call = c.get(j) == Some(&'(') || grouped;
                if GROUPING.contains(&word.as_str()) {
                    if call {
                        i = skip(j, '(', ')');
                    }
                } else if !call && !KEYWORDS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Workspace packages and their binary targets (`cargo metadata --no-deps`).
fn workspace_bins() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Json = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let mut bins = BTreeMap::new();
    for package in meta["packages"].as_array().expect("packages") {
        let targets = package["targets"].as_array().expect("targets");
        let names = targets
            .iter()
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.contains(&"bin".into()))
            })
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect();
        bins.insert(package["name"].as_str().expect("name").to_owned(), names);
    }
    bins
}

// ------------------------------------------------------------------------- compose

struct Compose {
    services: BTreeMap<String, Yaml>,
}

impl Compose {
    fn load() -> Self {
        let file = yaml("docker-compose.yml");
        let services = mapping(&file["services"])
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect::<BTreeMap<_, _>>();
        assert!(!services.is_empty(), "docker-compose.yml has no services");
        Self { services }
    }

    /// The pgws package a service is built from (`deploy/docker/<package>.Dockerfile`).
    fn package(&self, service: &str) -> Option<String> {
        let dockerfile = text(&self.services[service]["build"]["dockerfile"]);
        let name = dockerfile
            .strip_prefix("deploy/docker/")?
            .strip_suffix(".Dockerfile")?;
        Some(name.to_owned())
    }

    /// The compose services built as `package`.
    fn built_as(&self, package: &str) -> Vec<String> {
        self.services
            .keys()
            .filter(|s| self.package(s).as_deref() == Some(package))
            .cloned()
            .collect()
    }

    fn environment(&self, service: &str) -> BTreeMap<String, String> {
        let env = &self.services[service]["environment"];
        if let Some(list) = env.as_sequence() {
            list.iter()
                .map(|e| {
                    let e = text(e);
                    let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        } else {
            mapping(env)
                .into_iter()
                .map(|(k, v)| (k, text(v)))
                .collect()
        }
    }

    /// The env files a service reads, in order.
    fn env_files(&self, service: &str) -> Vec<String> {
        let files = &self.services[service]["env_file"];
        match files {
            Yaml::Sequence(_) => strings(files),
            Yaml::Null => Vec::new(),
            _ => vec![text(files)],
        }
    }

    /// What a service's container receives: its env files in order, then `environment`.
    fn resolved_env(&self, service: &str) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = self
            .env_files(service)
            .iter()
            .flat_map(|f| env_file(f))
            .collect();
        env.extend(self.environment(service));
        env
    }

    /// Services that run once and others wait for with `service_completed_successfully`.
    fn one_shots(&self) -> BTreeSet<String> {
        self.services
            .values()
            .flat_map(|s| mapping(&s["depends_on"]))
            .filter(|(_, d)| text(&d["condition"]) == "service_completed_successfully")
            .map(|(name, _)| name)
            .collect()
    }

    fn healthcheck_command(&self, service: &str) -> String {
        let test = &self.services[service]["healthcheck"]["test"];
        match test {
            Yaml::Sequence(_) => strings(test).join(" "),
            _ => text(test),
        }
    }
}

/// The host of a URL or URI (`scheme://[user[:pass]@]host[:port][/...]`).
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split([':', '/', ',']).next().unwrap_or("").to_owned()
}

#[test]
fn the_compose_file_is_valid_for_docker_compose() {
    let (program, prefix): (&str, &[&str]) = if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        ("docker-compose", &[])
    } else if Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        ("docker", &["compose"])
    } else {
        panic!(
            "neither docker-compose nor `docker compose` is installed: scripts/test.sh installs \
             it with scripts/deploy-test-setup.sh (apt-get install docker-compose)"
        );
    };
    let run = |args: &[&str]| {
        let out = Command::new(program)
            .args(prefix)
            .args(["-f", "docker-compose.yml"])
            .args(args)
            .current_dir(root())
            .output()
            .expect("running docker-compose");
        assert!(
            out.status.success(),
            "{program} config {args:?} refused docker-compose.yml:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["config", "-q"]);
    // docker-compose sees the services this module's other tests check.
    let listed: BTreeSet<String> = run(&["config", "--services"])
        .lines()
        .map(str::to_owned)
        .collect();
    let parsed: BTreeSet<String> = Compose::load().services.into_keys().collect();
    assert_eq!(listed, parsed);
    // What docker-compose hands the containers: the gateway gets its NATS user and no database
    // credentials; NATS runs the shipped configuration.
    let resolved: Yaml = serde_norway::from_str(&run(&["config"])).expect("config output");
    let env_of = |service: &str| {
        mapping(&resolved["services"][service]["environment"])
            .into_iter()
            .map(|(k, v)| (k, text(v)))
            .collect::<BTreeMap<String, String>>()
    };
    let gateway = env_of("ws-gateway");
    assert!(
        !gateway.contains_key("PGWS_DB_URI"),
        "docker-compose gives the gateway PGWS_DB_URI"
    );
    assert_eq!(
        gateway.get("PGWS_NATS_USER").map(String::as_str),
        Some(nats_user_of("ws-gateway"))
    );
    assert!(gateway.contains_key("PGWS_NATS_PASSWORD"));
    let nats = strings(&resolved["services"]["nats"]["command"]);
    assert!(
        nats.windows(2)
            .any(|w| w[0] == "-c" && w[1].ends_with(".conf")),
        "NATS does not run a configuration file: {nats:?}"
    );
    for (var, _) in env_file("deploy/compose/nats.env") {
        assert!(
            env_of("nats").contains_key(&var),
            "docker-compose does not give NATS {var}"
        );
    }
}

#[test]
fn every_compose_service_is_health_checked_and_started_in_order() {
    let compose = Compose::load();
    let one_shots = compose.one_shots();
    for (name, service) in &compose.services {
        if one_shots.contains(name) {
            assert_eq!(
                text(&service["restart"]),
                "no",
                "{name} runs once: restart must be \"no\""
            );
        } else {
            let check = compose.healthcheck_command(name);
            assert!(
                (check.starts_with("CMD ") || check.starts_with("CMD-SHELL "))
                    && service["healthcheck"]["disable"].as_bool() != Some(true),
                "{name} has no health check (test: {check:?})"
            );
        }
        for (dep, how) in mapping(&service["depends_on"]) {
            assert!(
                compose.services.contains_key(&dep),
                "{name} depends on {dep}, which is not a service"
            );
            let condition = text(&how["condition"]);
            match condition.as_str() {
                "service_healthy" => assert!(
                    !one_shots.contains(&dep),
                    "{name} waits for {dep} to be healthy, but {dep} runs once"
                ),
                "service_completed_successfully" => {}
                _ => panic!("{name} depends on {dep} without a health condition ({condition:?})"),
            }
        }
        assert!(
            service["depends_on"].is_null() || service["depends_on"].is_mapping(),
            "{name}: depends_on must be the long form with conditions"
        );
    }
    for required in ["postgres", "nats", "otel-collector", "jaeger", "prometheus"] {
        assert!(compose.services.contains_key(required), "no {required}");
    }
    assert!(text(&compose.services["postgres"]["image"]).starts_with("postgres:15"));
    assert!(text(&compose.services["nats"]["image"]).starts_with("nats:2.10"));
    // NATS runs JetStream (deploy/compose/nats.conf) with its store on a volume.
    let conf = read("deploy/compose/nats.conf");
    assert!(
        conf.lines().any(|l| l.starts_with("jetstream {"))
            && conf.contains("store_dir: \"/data\"")
            && strings(&compose.services["nats"]["volumes"]).contains(&"natsdata:/data".to_owned()),
        "NATS keeps no JetStream store on the natsdata volume"
    );

    // The pgws services check /readyz on their own admin port, and wait for their dependencies.
    for package in SERVICES {
        let services = compose.built_as(package);
        assert!(!services.is_empty(), "no compose service runs {package}");
        let dockerfile = read(&format!("deploy/docker/{package}.Dockerfile"));
        for name in services {
            let check = compose.healthcheck_command(&name);
            let url = format!("http://127.0.0.1:{}/readyz", admin_port(package));
            assert!(
                check.contains(&url),
                "{name}: health check {check:?} is not {url}"
            );
            let tool = check.split_whitespace().nth(1).unwrap_or_default();
            assert!(
                dockerfile.contains(&format!(" {tool}")),
                "{name}: the health check runs {tool}, which the image does not install"
            );
            let service_env = compose.environment(&name);
            assert!(
                !compose.resolved_env(&name).contains_key("PGWS_ADMIN_PORT"),
                "{name}: the checks and Prometheus assume the default admin port"
            );
            assert_eq!(
                service_env.get("OTEL_SERVICE_NAME").map(String::as_str),
                Some(package),
                "{name}: OTEL_SERVICE_NAME"
            );
            let otlp = service_env
                .get("OTEL_EXPORTER_OTLP_ENDPOINT")
                .unwrap_or_else(|| panic!("{name}: OTEL_EXPORTER_OTLP_ENDPOINT"));
            // The endpoint is the collector's port for the protocol: 4318 for HTTP/protobuf
            // (the default), 4317 for gRPC.
            let protocol = service_env
                .get("OTEL_EXPORTER_OTLP_PROTOCOL")
                .map_or("http/protobuf", String::as_str);
            let port = match protocol {
                "http/protobuf" => 4318,
                "grpc" => 4317,
                other => panic!("{name}: OTEL_EXPORTER_OTLP_PROTOCOL {other:?}"),
            };
            assert_eq!(
                otlp,
                &format!("http://otel-collector:{port}"),
                "{name} ({protocol})"
            );
            assert!(
                compose
                    .env_files(&name)
                    .contains(&"deploy/compose/pgws.env".to_owned()),
                "{name} does not read deploy/compose/pgws.env"
            );
            let deps: BTreeSet<String> = mapping(&compose.services[&name]["depends_on"])
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert!(deps.contains("nats"), "{name} does not wait for NATS");
            if package == "ws-gateway" {
                // nats.conf lets a gateway read the audit stream, not create it.
                assert!(
                    deps.contains("pg-recorder"),
                    "{name} does not wait for the recorder, which creates the audit stream"
                );
            } else {
                assert!(
                    deps.contains("postgres"),
                    "{name} does not wait for PostgreSQL"
                );
            }
        }
    }
}

#[test]
fn the_gateway_scales_behind_the_load_balancer_and_two_bridges_run() {
    let compose = Compose::load();
    let gateways = compose.built_as("ws-gateway");
    assert_eq!(gateways, ["ws-gateway"], "one scalable gateway service");
    let gateway = &compose.services["ws-gateway"];
    assert!(
        gateway["ports"].is_null(),
        "ws-gateway publishes a host port: --scale ws-gateway=N would collide"
    );
    assert!(
        gateway["container_name"].is_null(),
        "ws-gateway has a container_name"
    );
    assert!(
        gateway["deploy"]["replicas"].is_null(),
        "ws-gateway fixes its replicas; scale it with --scale"
    );
    let bridges = compose.built_as("pg-bridge");
    assert_eq!(bridges.len(), 2, "two pg-bridge replicas: {bridges:?}");
    for bridge in &bridges {
        assert!(compose.services[bridge]["container_name"].is_null());
    }

    // The load balancer: nginx resolving `ws-gateway` through Docker's DNS per request,
    // proxying websocket upgrades to the gateways' PGWS_PORT.
    let env = compose.resolved_env("ws-gateway");
    let lb = compose
        .services
        .iter()
        .find(|(_, s)| text(&s["image"]).starts_with("nginx:"))
        .map(|(n, _)| n.clone())
        .expect("an nginx load balancer service");
    assert!(
        !compose.services[&lb]["ports"].is_null(),
        "{lb} publishes no port"
    );
    let mounts = strings(&compose.services[&lb]["volumes"]);
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./deploy/compose/nginx.conf:")),
        "{lb} does not mount deploy/compose/nginx.conf: {mounts:?}"
    );
    let nginx = read("deploy/compose/nginx.conf");
    let port = env.get("PGWS_PORT").expect("PGWS_PORT for ws-gateway");
    for needle in [
        "resolver 127.0.0.11".to_owned(),
        format!("ws-gateway:{port}"),
        "proxy_http_version 1.1".to_owned(),
        "proxy_set_header Upgrade $http_upgrade".to_owned(),
        "proxy_set_header Connection $connection_upgrade".to_owned(),
    ] {
        assert!(nginx.contains(&needle), "nginx.conf lacks {needle:?}");
    }
    assert!(
        compose.healthcheck_command(&lb).contains("/lb-healthz")
            && nginx.contains("location = /lb-healthz"),
        "the load balancer's health check is not the location nginx.conf answers"
    );
}

#[test]
fn the_compose_env_files_set_only_real_settings() {
    let compose = Compose::load();
    let files: BTreeSet<String> = SERVICES
        .iter()
        .flat_map(|p| compose.built_as(p))
        .flat_map(|s| compose.env_files(&s))
        .collect();
    for file in &files {
        assert_real_settings(file, env_file(file).into_iter().map(|(k, _)| k));
    }
    assert_real_settings(
        "deploy/sample.env",
        env_file("deploy/sample.env").into_iter().map(|(k, _)| k),
    );
    let image_of = |host: &str| {
        compose
            .services
            .get(host)
            .map(|s| text(&s["image"]))
            .unwrap_or_else(|| panic!("{host} is not a compose service"))
    };
    for package in ["pg-bridge", "pg-recorder"] {
        for name in compose.built_as(package) {
            let env = compose.resolved_env(&name);
            let uri = env
                .get("PGWS_DB_URI")
                .unwrap_or_else(|| panic!("{name} has no PGWS_DB_URI"));
            let db = url_host(uri);
            assert!(
                image_of(&db).starts_with("postgres:"),
                "PGWS_DB_URI names {db}"
            );
            let password = if package == "pg-bridge" {
                // Not a superuser: the role deploy/bridge-role.sql makes, with the password
                // the one-shot pgws-db-setup gives it before any bridge starts.
                assert!(
                    uri.starts_with("postgres://pgws_bridge:"),
                    "{name}: the bridges connect as pgws_bridge, not {uri}"
                );
                let setup = &compose.services["pgws-db-setup"];
                assert!(
                    compose.one_shots().contains("pgws-db-setup")
                        && text(
                            &compose.services[&name]["depends_on"]["pgws-db-setup"]["condition"]
                        ) == "service_completed_successfully",
                    "{name} must wait for pgws-db-setup"
                );
                strings(&setup["command"])
                    .iter()
                    .find_map(|a| a.strip_prefix("bridge_password=").map(str::to_owned))
                    .expect("pgws-db-setup gives pgws_bridge a password")
            } else {
                text(&compose.services[&db]["environment"]["POSTGRES_PASSWORD"])
            };
            assert!(
                uri.contains(&format!(":{password}@")),
                "{name}: PGWS_DB_URI does not carry the password of its database role"
            );
        }
    }
    for package in SERVICES {
        for name in compose.built_as(package) {
            let env = compose.resolved_env(&name);
            let nats = url_host(&env["PGWS_NATS_URL"]);
            assert!(
                image_of(&nats).starts_with("nats:"),
                "PGWS_NATS_URL names {nats}"
            );
            assert_eq!(
                env.get("PGWS_ADMIN_HOST").map(String::as_str),
                Some("0.0.0.0"),
                "the admin listener must listen beyond the container's loopback for Prometheus"
            );
        }
    }
    let env = compose.resolved_env("ws-gateway");
    assert_eq!(
        env.get("PGWS_JWT_SECRET").map(String::as_str),
        Some(pgws_tests::SECRET)
    );
    // The gateway's static root is where its image puts the demo page and the client it
    // imports (examples/demo/pgws.js is a link to clients/js/pgws.js, which an image cannot
    // follow: the files are copied one by one).
    let root_path = &env["PGWS_ROOT_PATH"];
    let dockerfile = read("deploy/docker/ws-gateway.Dockerfile");
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY examples/demo/") && l.ends_with(&format!(" {root_path}/")))
        .unwrap_or_else(|| panic!("ws-gateway.Dockerfile does not copy the demo to {root_path}/"));
    for file in [
        "examples/demo/index.html",
        "examples/demo/demo.js",
        "clients/js/pgws.js",
    ] {
        assert!(copy.split(' ').any(|w| w == file), "{copy} lacks {file}");
    }
}

#[test]
fn the_compose_bus_gives_each_service_its_own_nats_user_and_the_gateway_no_database() {
    let compose = Compose::load();
    // NATS runs the shipped configuration, bind-mounted, with every password it reads.
    let nats = &compose.services["nats"];
    let command = strings(&nats["command"]);
    let conf = command
        .windows(2)
        .find(|w| w[0] == "-c")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("NATS does not run a configuration file: {command:?}"));
    assert!(
        strings(&nats["volumes"]).contains(&format!("./deploy/compose/nats.conf:{conf}:ro")),
        "NATS does not mount deploy/compose/nats.conf at {conf}"
    );
    assert!(
        nats["ports"].is_null(),
        "NATS publishes a port: only the stack may reach it"
    );
    let text_conf = read("deploy/compose/nats.conf");
    assert!(
        !authorization_block(&text_conf).is_empty() && !text_conf.contains("no_auth_user"),
        "nats.conf must require a user"
    );
    let nats_env = compose.resolved_env("nats");
    let users = nats_conf_users();
    assert_eq!(
        users.keys().cloned().collect::<BTreeSet<_>>(),
        NATS_USERS.iter().map(|(_, u)| (*u).to_owned()).collect(),
        "the users of nats.conf"
    );
    for package in SERVICES {
        for name in compose.built_as(package) {
            let env = compose.resolved_env(&name);
            let user = nats_user_of(package);
            assert_eq!(
                env.get("PGWS_NATS_USER").map(String::as_str),
                Some(user),
                "{name}: PGWS_NATS_USER"
            );
            let var = &users[user];
            assert_eq!(
                env.get("PGWS_NATS_PASSWORD"),
                nats_env.get(var),
                "{name}: PGWS_NATS_PASSWORD is not NATS' {var}"
            );
            assert!(nats_env.get(var).is_some_and(|p| !p.is_empty()));
            let holds_db = env.contains_key("PGWS_DB_URI");
            let holds_jwt = env.contains_key("PGWS_JWT_SECRET");
            if package == "ws-gateway" {
                assert!(!holds_db, "{name} receives database credentials");
                assert!(holds_jwt, "{name} has no JWT secret");
            } else {
                assert!(holds_db, "{name} has no PGWS_DB_URI");
                assert!(!holds_jwt, "{name} receives the JWT secret");
            }
        }
    }
}

#[test]
fn the_observability_services_point_at_the_stack() {
    let compose = Compose::load();
    // Every bind mount exists.
    for (name, service) in &compose.services {
        for mount in strings(&service["volumes"]) {
            if let Some(source) = mount.strip_prefix("./") {
                let source = source.split(':').next().unwrap_or_default();
                assert!(
                    root().join(source).exists(),
                    "{name} mounts missing ./{source}"
                );
            }
        }
    }

    // Prometheus scrapes every pgws service on its admin port; the gateways through DNS.
    let prometheus = yaml("deploy/compose/prometheus.yml");
    let jobs = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let dns = jobs
        .iter()
        .flat_map(|j| {
            j["dns_sd_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .find(|d| strings(&d["names"]).contains(&"ws-gateway".to_owned()))
        .expect("a dns_sd_config for ws-gateway");
    assert_eq!(text(&dns["type"]), "A");
    assert_eq!(text(&dns["port"]), admin_port("ws-gateway").to_string());
    let targets: BTreeSet<String> = jobs
        .iter()
        .flat_map(|j| {
            j["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|s| strings(&s["targets"]))
        .collect();
    for target in &targets {
        let host = target.split(':').next().unwrap_or_default();
        assert!(
            host == "127.0.0.1" || compose.services.contains_key(host),
            "Prometheus scrapes {target}, not a compose service"
        );
    }
    for package in ["pg-bridge", "pg-recorder"] {
        for service in compose.built_as(package) {
            let target = format!("{service}:{}", admin_port(package));
            assert!(
                targets.contains(&target),
                "Prometheus does not scrape {target}"
            );
        }
    }

    // The collector takes OTLP over gRPC on 4317 and over HTTP on 4318, and sends traces to
    // the Jaeger service.
    let otel = yaml("deploy/compose/otel-collector.yaml");
    assert_eq!(
        text(&otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]),
        "0.0.0.0:4317"
    );
    assert_eq!(
        text(&otel["receivers"]["otlp"]["protocols"]["http"]["endpoint"]),
        "0.0.0.0:4318"
    );
    let exporters = strings(&otel["service"]["pipelines"]["traces"]["exporters"]);
    assert!(!exporters.is_empty(), "the collector exports no traces");
    for exporter in exporters {
        let endpoint = text(&otel["exporters"][exporter.as_str()]["endpoint"]);
        let host = url_host(&endpoint);
        assert!(
            text(&compose.services[&host]["image"]).starts_with("jaegertracing/"),
            "traces go to {endpoint}, not to Jaeger"
        );
    }
    let health = text(&otel["extensions"]["health_check"]["endpoint"]);
    let health_port = health.rsplit(':').next().unwrap_or_default();
    assert!(
        compose
            .healthcheck_command("otel-collector")
            .contains(&format!(":{health_port}/")),
        "the collector's health check does not ask its health_check extension ({health})"
    );
    let jaeger_ports = strings(&compose.services["jaeger"]["ports"]);
    assert!(
        jaeger_ports.iter().any(|p| p.ends_with(":16686")),
        "the Jaeger UI is not published on 16686: {jaeger_ports:?}"
    );

    // Grafana: the stack's Prometheus and the dashboard folder.
    let datasources = yaml("deploy/compose/grafana/datasources.yaml");
    let url = text(&datasources["datasources"][0]["url"]);
    assert!(
        text(&compose.services[&url_host(&url)]["image"]).starts_with("prom/prometheus"),
        "the Grafana datasource {url} is not the Prometheus service"
    );
    let providers = yaml("deploy/compose/grafana/dashboards.yaml");
    let path = text(&providers["providers"][0]["options"]["path"]);
    let mounts = strings(&compose.services["grafana"]["volumes"]);
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./deploy/grafana:") && m.contains(&format!(":{path}"))),
        "Grafana does not find deploy/grafana at {path}: {mounts:?}"
    );
    let home = compose.environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].clone();
    let file = home
        .strip_prefix(&format!("{path}/"))
        .unwrap_or_else(|| panic!("the home dashboard {home} is outside {path}"));
    assert!(root().join("deploy/grafana").join(file).is_file(), "{home}");
}

// ------------------------------------------------------------------------- images

#[test]
fn the_images_build_workspace_binaries_and_run_unprivileged() {
    let bins = workspace_bins();
    let compose = Compose::load();
    for (name, service) in &compose.services {
        if service["build"].is_null() {
            continue;
        }
        assert_eq!(
            text(&service["build"]["context"]),
            ".",
            "{name}: build context"
        );
        let dockerfile = text(&service["build"]["dockerfile"]);
        assert!(
            root().join(&dockerfile).is_file(),
            "{name}: no {dockerfile}"
        );
        assert!(compose.package(name).is_some(), "{name}: {dockerfile}");
    }
    for package in SERVICES {
        assert!(
            bins.get(package).is_some_and(|b| b.contains(package)),
            "the workspace has no binary {package}"
        );
    }
    let dir = root().join("deploy/docker");
    let mut seen = BTreeSet::new();
    let mut builders = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/docker") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        let Some(package) = file.strip_suffix(".Dockerfile") else {
            continue;
        };
        let rel = format!("deploy/docker/{file}");
        let text = read(&rel);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let froms: Vec<&str> = lines
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .copied()
            .collect();
        assert_eq!(
            froms.first().copied(),
            Some("FROM rust:1-bookworm AS builder"),
            "{rel}: builder stage"
        );
        assert_eq!(
            froms.last().copied(),
            Some("FROM debian:bookworm-slim"),
            "{rel}: runtime stage"
        );
        let build: Vec<&str> = lines
            .iter()
            .find_map(|l| l.split_once("cargo build ").map(|(_, args)| args))
            .unwrap_or_else(|| panic!("{rel}: no cargo build"))
            .split_whitespace()
            .take_while(|a| *a != "&&" && *a != "\\")
            .collect();
        for flag in ["--release", "--locked"] {
            assert!(
                build.contains(&flag),
                "{rel}: cargo build {build:?} without {flag}"
            );
        }
        let built: Vec<&str> = build
            .windows(2)
            .filter(|w| w[0] == "-p")
            .map(|w| w[1])
            .collect();
        assert!(
            built.contains(&package),
            "{rel}: cargo build {build:?} does not build {package}"
        );
        // One builder for the three images: the same stage, so it is built once and cached.
        let builder: Vec<&str> = text
            [text.find("FROM rust:").expect("builder")..text.rfind("\nFROM ").expect("runtime")]
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        builders.insert(rel.clone(), builder.join("\n"));
        let package_bins = bins
            .get(package)
            .unwrap_or_else(|| panic!("{rel}: {package} is not a workspace package"));
        let runtime = &text[text.rfind("\nFROM ").expect("runtime stage")..];
        let entrypoint = runtime
            .lines()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .unwrap_or_else(|| panic!("{rel}: no ENTRYPOINT"));
        let entry: Vec<String> = serde_json::from_str(entrypoint).expect("ENTRYPOINT in exec form");
        let binary = entry[0].rsplit('/').next().unwrap_or_default();
        assert!(
            package_bins.contains(binary),
            "{rel}: ENTRYPOINT {binary} is not a binary of {package} ({package_bins:?})"
        );
        assert!(
            runtime.contains(&format!("COPY --from=builder /out/{binary} {}", entry[0])),
            "{rel}: the ENTRYPOINT is not the binary the builder made"
        );
        let user = runtime
            .lines()
            .filter_map(|l| l.strip_prefix("USER "))
            .next_back()
            .unwrap_or_else(|| panic!("{rel}: no USER in the runtime stage"));
        let uid = user.split(':').next().unwrap_or_default();
        assert_eq!(uid, "10001", "{rel}: runs as {user}");
        assert!(
            runtime.contains("--uid 10001"),
            "{rel}: user 10001 is not created"
        );
        assert!(
            runtime.contains("ca-certificates"),
            "{rel}: no CA certificates"
        );
        let exposed: Vec<u16> = runtime
            .lines()
            .filter_map(|l| l.strip_prefix("EXPOSE "))
            .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect();
        assert!(
            exposed.contains(&admin_port(package)),
            "{rel}: admin port {} not exposed",
            admin_port(package)
        );
        seen.insert(package.to_owned());
    }
    assert_eq!(
        seen,
        SERVICES.iter().map(|s| (*s).to_owned()).collect(),
        "one Dockerfile per service"
    );
    let distinct: BTreeSet<&String> = builders.values().collect();
    assert_eq!(
        distinct.len(),
        1,
        "the Dockerfiles' builder stages differ, so each image compiles the workspace: {builders:#?}"
    );
    let ignore = read(".dockerignore");
    for entry in ["target", ".git", "node_modules"] {
        assert!(
            ignore.lines().any(|l| l.trim_end_matches('/') == entry),
            ".dockerignore does not leave out {entry}"
        );
    }
}

// ------------------------------------------------------------------------- kubernetes

struct K8s {
    objects: Vec<Yaml>,
}

impl K8s {
    fn load() -> Self {
        let kustomization = yaml("deploy/k8s/kustomization.yaml");
        let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
        let present: BTreeSet<String> = std::fs::read_dir(root().join("deploy/k8s"))
            .expect("deploy/k8s")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
            .collect();
        assert_eq!(
            listed, present,
            "kustomization.yaml resources vs. the files"
        );
        let objects: Vec<Yaml> = listed
            .iter()
            .flat_map(|f| yaml_docs(&format!("deploy/k8s/{f}")))
            .collect();
        for o in &objects {
            assert!(
                !text(&o["apiVersion"]).is_empty() && !text(&o["kind"]).is_empty(),
                "an object without apiVersion/kind: {o:?}"
            );
            assert!(
                !text(&o["metadata"]["name"]).is_empty(),
                "an object without a name"
            );
        }
        Self { objects }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Yaml> {
        self.objects
            .iter()
            .filter(|o| text(&o["kind"]) == kind)
            .collect()
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Yaml> {
        self.of_kind(kind)
            .into_iter()
            .find(|o| text(&o["metadata"]["name"]) == name)
    }

    /// Keys of a ConfigMap's `data` or a Secret's `stringData` / `data`.
    fn keys(&self, kind: &str, name: &str) -> Vec<String> {
        let o = self
            .get(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name}"));
        ["data", "stringData"]
            .iter()
            .flat_map(|f| mapping(&o[*f]))
            .map(|(k, _)| k)
            .collect()
    }
}

/// Whether `selector` (matchLabels) selects pods labelled `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let wanted = mapping(selector);
    !wanted.is_empty()
        && wanted
            .iter()
            .all(|(k, v)| text(&labels[k.as_str()]) == text(v))
}

#[test]
fn the_kubernetes_deployments_probe_the_admin_port_and_bound_their_resources() {
    let k8s = K8s::load();
    let config_keys = k8s.keys("ConfigMap", "pgws-config");
    assert_real_settings("the ConfigMap pgws-config", config_keys.clone());
    for secret in k8s.of_kind("Secret") {
        let name = text(&secret["metadata"]["name"]);
        assert_real_settings(&format!("the Secret {name}"), k8s.keys("Secret", &name));
    }
    assert!(!config_keys.contains(&"PGWS_ADMIN_PORT".to_owned()));
    for secret in [
        "PGWS_DB_URI",
        "PGWS_JWT_SECRET",
        "PGWS_NATS_USER",
        "PGWS_NATS_PASSWORD",
    ] {
        assert!(
            !config_keys.contains(&secret.to_owned()),
            "every service reads the ConfigMap: {secret} belongs in a Secret"
        );
    }
    let config = k8s.get("ConfigMap", "pgws-config").expect("ConfigMap");
    assert_eq!(
        text(&config["data"]["PGWS_ADMIN_HOST"]),
        "0.0.0.0",
        "the kubelet probes the pod address: the admin listener must not stay on loopback"
    );

    let mut deployed = BTreeSet::new();
    for deployment in k8s.of_kind("Deployment") {
        let name = text(&deployment["metadata"]["name"]);
        let spec = &deployment["spec"];
        let pod = &spec["template"]["spec"];
        assert!(
            selects(
                &spec["selector"]["matchLabels"],
                &spec["template"]["metadata"]["labels"]
            ),
            "{name}: the selector does not select its own pods"
        );
        let containers = pod["containers"].as_sequence().expect("containers");
        for c in containers {
            let image = text(&c["image"]);
            let package = image
                .split(':')
                .next()
                .and_then(|i| i.rsplit('/').next())
                .unwrap_or_default()
                .to_owned();
            assert!(
                SERVICES.contains(&package.as_str()),
                "{name}: image {image} is not one of {SERVICES:?}"
            );
            deployed.insert(package.clone());
            let ports: BTreeMap<String, String> = c["ports"]
                .as_sequence()
                .map(|ps| {
                    ps.iter()
                        .map(|p| (text(&p["name"]), text(&p["containerPort"])))
                        .collect()
                })
                .unwrap_or_default();
            let admin = admin_port(&package).to_string();
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(text(&get["path"]), path, "{name}: {probe} path");
                let port = text(&get["port"]);
                let port = ports.get(&port).cloned().unwrap_or(port);
                assert_eq!(port, admin, "{name}: {probe} is not on the admin port");
            }
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        !text(&c["resources"][bound][resource]).is_empty(),
                        "{name}: no {bound}.{resource}"
                    );
                }
            }
            let non_root = c["securityContext"]["runAsNonRoot"]
                .as_bool()
                .or(pod["securityContext"]["runAsNonRoot"].as_bool());
            assert_eq!(non_root, Some(true), "{name}: runAsNonRoot");
            let mut secrets = BTreeSet::new();
            for source in c["envFrom"].as_sequence().cloned().unwrap_or_default() {
                let (kind, reference) = if source["configMapRef"].is_null() {
                    ("Secret", text(&source["secretRef"]["name"]))
                } else {
                    ("ConfigMap", text(&source["configMapRef"]["name"]))
                };
                assert!(
                    k8s.get(kind, &reference).is_some(),
                    "{name} reads the missing {kind} {reference}"
                );
                if kind == "Secret" {
                    secrets.insert(reference);
                }
            }
            for var in c["env"].as_sequence().cloned().unwrap_or_default() {
                let key = &var["valueFrom"]["secretKeyRef"];
                if !key.is_null() {
                    secrets.insert(text(&key["name"]));
                }
            }
            // Each service its own secrets: the gateway no database credentials, and every
            // service the NATS user of deploy/compose/nats.conf made for it.
            let held: Vec<String> = secrets.iter().flat_map(|s| k8s.keys("Secret", s)).collect();
            let holds = |key: &str| held.iter().any(|k| k == key);
            assert_eq!(
                holds("PGWS_DB_URI"),
                package != "ws-gateway",
                "{name}: PGWS_DB_URI (the gateway must hold no database credentials)"
            );
            assert_eq!(
                holds("PGWS_JWT_SECRET"),
                package == "ws-gateway",
                "{name}: JWT"
            );
            let users: Vec<String> = secrets
                .iter()
                .filter_map(|s| k8s.get("Secret", s))
                .map(|s| text(&s["stringData"]["PGWS_NATS_USER"]))
                .filter(|u| !u.is_empty())
                .collect();
            assert_eq!(users, [nats_user_of(&package)], "{name}: its NATS user");
            assert!(holds("PGWS_NATS_PASSWORD"), "{name}: no NATS password");
        }
        if name == "pg-bridge" {
            assert!(
                spec["replicas"].as_u64().unwrap_or(1) >= 2,
                "pg-bridge runs two replicas"
            );
        }
    }
    assert_eq!(
        deployed,
        SERVICES.iter().map(|s| (*s).to_owned()).collect(),
        "a Deployment per service"
    );
    for service in k8s.of_kind("Service") {
        let name = text(&service["metadata"]["name"]);
        assert!(
            k8s.of_kind("Deployment").iter().any(|d| selects(
                &service["spec"]["selector"],
                &d["spec"]["template"]["metadata"]["labels"]
            )),
            "the Service {name} selects no Deployment's pods"
        );
    }
}

#[test]
fn the_kubernetes_readme_quotes_the_shipped_nats_authorization() {
    let readme = read("deploy/k8s/README.md");
    let quoted = authorization_block(&readme);
    assert!(
        !quoted.is_empty(),
        "deploy/k8s/README.md quotes no authorization block"
    );
    assert_eq!(
        quoted,
        authorization_block(&read("deploy/compose/nats.conf")),
        "deploy/k8s/README.md's authorization block differs from deploy/compose/nats.conf's"
    );
}

#[test]
fn the_kubernetes_autoscaler_and_disruption_budgets_target_deployments() {
    let k8s = K8s::load();
    let hpas = k8s.of_kind("HorizontalPodAutoscaler");
    assert!(!hpas.is_empty(), "no HorizontalPodAutoscaler");
    let mut scaled = BTreeSet::new();
    for hpa in hpas {
        assert_eq!(text(&hpa["apiVersion"]), "autoscaling/v2");
        let target = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(text(&target["kind"]), "Deployment");
        let name = text(&target["name"]);
        assert!(
            k8s.get("Deployment", &name).is_some(),
            "the autoscaler targets the missing Deployment {name}"
        );
        let min = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
        let max = hpa["spec"]["maxReplicas"].as_u64().unwrap_or(0);
        assert!(1 <= min && min <= max, "{name}: replicas {min}..{max}");
        scaled.insert(name);
    }
    assert!(
        scaled.contains("ws-gateway"),
        "the gateway is not autoscaled"
    );

    let mut budgeted = BTreeSet::new();
    for pdb in k8s.of_kind("PodDisruptionBudget") {
        assert_eq!(text(&pdb["apiVersion"]), "policy/v1");
        let name = text(&pdb["metadata"]["name"]);
        let targets: Vec<&Yaml> = k8s
            .of_kind("Deployment")
            .into_iter()
            .filter(|d| {
                selects(
                    &pdb["spec"]["selector"]["matchLabels"],
                    &d["spec"]["template"]["metadata"]["labels"],
                )
            })
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "the budget {name} selects {} Deployments",
            targets.len()
        );
        let deployment = targets[0];
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
        if let Some(min) = pdb["spec"]["minAvailable"].as_u64() {
            assert!(
                min < replicas,
                "{name}: minAvailable {min} of {replicas} blocks every drain"
            );
        }
        budgeted.insert(text(&deployment["metadata"]["name"]));
    }
    for name in ["ws-gateway", "pg-bridge"] {
        assert!(budgeted.contains(name), "no PodDisruptionBudget for {name}");
    }
}

// ------------------------------------------------------------------------- grafana

fn exprs(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Json::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Json::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn promql_metric_names_are_found_and_nothing_else() {
    assert_eq!(
        promql_metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(pgws_a_bucket{x="}", y=~"$v"}[$__rate_interval])))
               / on(instance) group_left sum(pgws_b offset 1h) by (instance) > bool 0.5 or vector(0)"#
        ),
        ["pgws_a_bucket", "pgws_b"]
    );
    assert_eq!(
        promql_metric_names("sum(up) without (job) and ${x}"),
        ["up"]
    );
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let dashboard: Json = serde_json::from_str(&read("deploy/grafana/pgws-dashboard.json"))
        .expect("the dashboard is JSON");
    assert!(!dashboard["title"].as_str().unwrap_or_default().is_empty());
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 10, "only {} queries", all.len());
    let registered = registered_metrics();
    let mut used = BTreeSet::new();
    for expr in &all {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{expr:?} names no metric");
        for name in names {
            let family = name
                .strip_prefix("pgws_")
                .unwrap_or_else(|| panic!("{expr:?}: {name} is not a pgws metric"));
            let found = ["", "_total", "_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| family.strip_suffix(suffix))
                .find(|f| registered.contains(*f))
                .unwrap_or_else(|| {
                    panic!("{expr:?}: {name} is not registered by any service (metric_names() of ws-gateway, pg-bridge, pg-recorder)")
                });
            used.insert(found.to_owned());
        }
    }
    for service in ["gateway", "bridge", "recorder"] {
        assert!(
            used.iter().any(|m| m.starts_with(&format!("{service}_"))),
            "no panel for the {service}"
        );
    }
    // Panels ask the dashboard's data source variable, which Grafana fills with Prometheus.
    let variable = &dashboard["templating"]["list"][0];
    assert_eq!(variable["type"], "datasource");
    assert_eq!(variable["query"], "prometheus");
}
