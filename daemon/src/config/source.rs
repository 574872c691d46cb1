//! Loads Istio and Gateway API resources from YAML files and directories (multi-document,
//! recursive, sorted).
//!
//! Kinds Drover uses are parsed into [`crd`] types; other Kubernetes, Istio and Gateway API kinds
//! are skipped with an info line; a document that is not a resource, an unknown
//! `networking.istio.io` kind or version, a version of a Gateway API kind Drover does not read,
//! and malformed YAML are problems. Fields the CRD mirror does not know become
//! warnings naming the field. All problems of all files are collected, so a user sees every
//! mistake at once.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use super::{Error, Location, Problem, crd, locate::Locator};

/// API versions of `networking.istio.io` that Drover accepts.
pub const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// `networking.istio.io` kinds that exist but that this version of Drover does not act on yet.
const KNOWN_UNUSED: [&str; 5] = [
    "Gateway",
    "Sidecar",
    "WorkloadGroup",
    "EnvoyFilter",
    "ProxyConfig",
];

/// API versions of `security.istio.io` that Drover accepts.
pub const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// The `telemetry.istio.io` versions accepted (identical shapes).
pub const TELEMETRY_VERSIONS: [&str; 2] = ["v1", "v1alpha1"];
/// `security.istio.io` kinds that exist but that this version of Drover does not act on yet.
const SECURITY_UNUSED: [&str; 1] = ["RequestAuthentication"];

/// API versions of `gateway.networking.k8s.io` that Drover accepts, by kind (`TCPRoute` is in
/// the experimental channel only).
const GATEWAY_VERSIONS: [(&str, &[&str]); 4] = [
    ("HTTPRoute", &["v1", "v1beta1"]),
    ("GRPCRoute", &["v1", "v1alpha2"]),
    ("TCPRoute", &["v1alpha2"]),
    ("ReferenceGrant", &["v1beta1", "v1alpha2"]),
];

/// Where a resource came from; turns field paths into located [`Problem`]s.
#[derive(Clone, Debug)]
pub struct Origin {
    pub file: Arc<PathBuf>,
    pub doc: usize,
    locator: Arc<Locator>,
}

/// One parsed resource.
#[derive(Clone, Debug)]
pub struct Resource<T> {
    pub origin: Origin,
    pub meta: crd::ObjectMeta,
    pub spec: T,
}

/// Everything loaded from a set of paths.
#[derive(Clone, Debug, Default)]
pub struct ConfigSet {
    pub service_entries: Vec<Resource<crd::ServiceEntrySpec>>,
    pub workload_entries: Vec<Resource<crd::WorkloadEntrySpec>>,
    pub destination_rules: Vec<Resource<crd::DestinationRuleSpec>>,
    pub virtual_services: Vec<Resource<crd::VirtualServiceSpec>>,
    pub peer_authentications: Vec<Resource<crd::PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Resource<crd::AuthorizationPolicySpec>>,
    pub http_routes: Vec<Resource<crd::gateway::HttpRouteSpec>>,
    pub grpc_routes: Vec<Resource<crd::gateway::GrpcRouteSpec>>,
    pub tcp_routes: Vec<Resource<crd::gateway::TcpRouteSpec>>,
    pub reference_grants: Vec<Resource<crd::gateway::ReferenceGrantSpec>>,
    pub telemetries: Vec<Resource<crd::telemetry::TelemetrySpec>>,
    /// Documents of other kinds, with where they are and what they are.
    pub skipped: Vec<(Location, String)>,
    /// Non-fatal findings (unknown fields), located.
    pub warnings: Vec<Problem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// Line and column (1-based) of the first alias (`*name`) in document `doc` of `text`.
fn first_alias(text: &str, doc: usize) -> Option<(usize, usize)> {
    let mut current = 0;
    let mut seen_content = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            if seen_content {
                current += 1;
            }
            seen_content = true;
            continue;
        }
        if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            seen_content = true;
        }
        if current != doc {
            continue;
        }
        let bytes = line.as_bytes();
        for (j, &b) in bytes.iter().enumerate() {
            let starts_node =
                j == 0 || matches!(bytes[j - 1], b' ' | b'[' | b',' | b'{' | b'-' | b':');
            let named = bytes
                .get(j + 1)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
            if b == b'*' && starts_node && named {
                return Some((i + 1, j + 1));
            }
        }
    }
    None
}

/// The most YAML one configuration may hold, all files together (16 MiB). A configuration costs
/// about 30 times its text at peak (the YAML tree, the position index, the typed resources and
/// the clusters built from them), so this bounds it to about 500 MiB; Istio configurations of
/// thousands of services stay well below it.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

// === impl Origin ===

impl Origin {
    /// A problem at `field` (a path such as `spec.ports[0].number`) of this document.
    pub fn problem(&self, field: impl Into<String>, message: impl Into<String>) -> Problem {
        let field = field.into();
        let (line, col) = self.locator.locate(self.doc, &field).unwrap_or((0, 0));
        Problem {
            location: Location {
                file: self.file.as_ref().clone(),
                line,
                col,
            },
            field,
            message: message.into(),
        }
    }
}

impl Origin {
    /// The origin of an object read from the Kubernetes API: problems name it `Kind
    /// namespace/name` (in place of a file) and carry no line.
    pub fn api(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            file: Arc::new(PathBuf::from(format!("{kind} {namespace}/{name}"))),
            doc: 0,
            locator: Arc::default(),
        }
    }

    /// `file:line:col` of `path` when the document spells out exactly that field.
    pub fn position(&self, path: &str) -> Option<String> {
        let (line, col) = self.locator.exact(self.doc, path)?;
        Some(format!("{}:{line}:{col}", self.file.display()))
    }
}

// === impl Resource ===

impl<T> Resource<T> {
    /// The resource's namespace (`default` when the metadata names none, as `kubectl` would).
    pub fn namespace(&self) -> &str {
        self.meta.namespace.as_deref().unwrap_or("default")
    }

    /// (creation timestamp, name): orders competing resources oldest first, as Istio does
    /// (a resource without a timestamp, from a file, counts as oldest).
    pub fn age(&self) -> (String, String) {
        (
            self.meta.creation_timestamp.clone().unwrap_or_default(),
            self.meta.name.clone(),
        )
    }

    /// `namespace/name`, as Istio names resources in messages.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace(), self.meta.name)
    }
}

// === impl ConfigSet ===

impl ConfigSet {
    /// Loads every YAML file named or found (recursively) under `paths`; any problem fails.
    pub fn load(paths: &[PathBuf]) -> Result<Self, Error> {
        let (set, problems) = Self::load_all(paths)?;
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(Error::Invalid(problems))
        }
    }

    /// Like [`ConfigSet::load`], but keeps every document that did parse next to the problems of
    /// those that did not, so that validation can report the rest too.
    pub fn load_all(paths: &[PathBuf]) -> Result<(Self, Vec<Problem>), Error> {
        let mut files = Vec::new();
        for path in paths {
            collect_files(path, &mut files)?;
        }
        let mut total = 0u64;
        for file in &files {
            total += fs::metadata(file).map_or(0, |m| m.len());
            if total > MAX_CONFIG_BYTES {
                return Err(Error::TooLarge {
                    path: file.clone(),
                    bytes: total,
                    limit: MAX_CONFIG_BYTES,
                });
            }
        }
        let mut set = ConfigSet::default();
        let mut problems = Vec::new();
        for file in files {
            let text = fs::read_to_string(&file).map_err(|source| Error::Read {
                path: file.clone(),
                source,
            })?;
            set.add_text(Arc::new(file), &text, &mut problems);
        }
        Ok((set, problems))
    }

    /// Parses one file's text, appending its resources to `self` and its problems to `problems`.
    pub fn add_text(&mut self, file: Arc<PathBuf>, text: &str, problems: &mut Vec<Problem>) {
        let locator = Arc::new(Locator::new(text));
        for (doc, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.clone(),
                doc,
                locator: locator.clone(),
            };
            let value = match serde_yaml::Value::deserialize(de) {
                Ok(v) => v,
                Err(e) => {
                    // Limits (alias expansion) carry no position: point at the first alias of the
                    // document, where the expansion starts.
                    let (line, col) = e
                        .location()
                        .map(|l| (l.line(), l.column()))
                        .or_else(|| first_alias(text, doc))
                        .unwrap_or((0, 0));
                    let message = format!("malformed YAML: {}", strip_location(&e.to_string()));
                    problems.push(Problem {
                        location: Location {
                            file: file.as_ref().clone(),
                            line,
                            col,
                        },
                        field: String::new(),
                        message,
                    });
                    // The stream cannot be resynchronised after a syntax error.
                    return;
                }
            };
            if value.is_null() {
                continue;
            }
            if let Err(p) = self.add_document(origin, value) {
                problems.push(p);
            }
        }
    }

    /// Adds one resource (a document, or an object read from the API) as a file document would be.
    pub fn add_document(
        &mut self,
        origin: Origin,
        value: serde_yaml::Value,
    ) -> Result<(), Problem> {
        if !value.is_mapping() {
            return Err(origin.problem(
                "",
                "document is not a Kubernetes resource (expected a mapping)",
            ));
        }
        let header: Header = serde_yaml::from_value(value.clone())
            .map_err(|e| origin.problem("", format!("bad resource header: {e}")))?;
        let api_version = header
            .api_version
            .ok_or_else(|| origin.problem("", "missing apiVersion"))?;
        let kind = header
            .kind
            .ok_or_else(|| origin.problem("", "missing kind"))?;
        let (group, version) = api_version
            .rsplit_once('/')
            .unwrap_or(("", api_version.as_str()));
        if group == "security.istio.io" {
            return self.add_security(origin, value, &kind, &api_version);
        }
        if group == "gateway.networking.k8s.io" {
            return self.add_gateway(origin, value, &kind, version);
        }
        if group == "telemetry.istio.io" {
            if !TELEMETRY_VERSIONS.contains(&version) || kind != "Telemetry" {
                return Err(origin.problem(
                    "apiVersion",
                    format!("unsupported {kind} {api_version:?} (expected telemetry.istio.io/v1 or v1alpha1 Telemetry)"),
                ));
            }
            let (meta, spec) = parse_typed(&origin, value, &mut self.warnings)?;
            self.telemetries.push(Resource { origin, meta, spec });
            return Ok(());
        }
        if group != "networking.istio.io" {
            let at = origin.problem("kind", "");
            tracing::info!(location = %at.location, kind = %kind, api_version = %api_version, "skipping resource of a kind drover does not use");
            self.skipped.push((at.location, kind));
            return Ok(());
        }
        if !ISTIO_VERSIONS.contains(&version) {
            return Err(origin.problem(
                "apiVersion",
                format!("unsupported version {api_version:?} (expected one of networking.istio.io/v1, v1beta1, v1alpha3)"),
            ));
        }
        let warnings = &mut self.warnings;
        match kind.as_str() {
            "ServiceEntry" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.service_entries.push(Resource { origin, meta, spec });
            }
            "WorkloadEntry" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.workload_entries.push(Resource { origin, meta, spec });
            }
            "DestinationRule" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.destination_rules.push(Resource { origin, meta, spec });
            }
            "VirtualService" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.virtual_services.push(Resource { origin, meta, spec });
            }
            k if KNOWN_UNUSED.contains(&k) => {
                let at = origin.problem("kind", "");
                tracing::info!(location = %at.location, kind = %kind, "skipping resource: not enforced by this version of drover");
                self.skipped.push((at.location, kind));
            }
            _ => {
                return Err(
                    origin.problem("kind", format!("unknown networking.istio.io kind {kind:?}"))
                );
            }
        }
        Ok(())
    }
}

impl ConfigSet {
    /// Adds a `security.istio.io` resource: `PeerAuthentication` and `AuthorizationPolicy` are
    /// read, `RequestAuthentication` is skipped (no JWT validation).
    fn add_security(
        &mut self,
        origin: Origin,
        value: serde_yaml::Value,
        kind: &str,
        api_version: &str,
    ) -> Result<(), Problem> {
        let version = api_version.rsplit('/').next().unwrap_or_default();
        if !SECURITY_VERSIONS.contains(&version) {
            return Err(origin.problem(
                "apiVersion",
                format!(
                    "unsupported version {api_version:?} (expected security.istio.io/v1 or v1beta1)"
                ),
            ));
        }
        match kind {
            "PeerAuthentication" => {
                let (meta, spec) = parse_typed(&origin, value, &mut self.warnings)?;
                self.peer_authentications
                    .push(Resource { origin, meta, spec });
            }
            "AuthorizationPolicy" => {
                let (meta, spec) = parse_typed(&origin, value, &mut self.warnings)?;
                self.authorization_policies
                    .push(Resource { origin, meta, spec });
            }
            k if SECURITY_UNUSED.contains(&k) => {
                let at = origin.problem("kind", "");
                tracing::warn!(location = %at.location, kind, "skipping resource: not enforced by this version of drover");
                self.skipped.push((at.location, kind.to_string()));
            }
            _ => {
                return Err(
                    origin.problem("kind", format!("unknown security.istio.io kind {kind:?}"))
                );
            }
        }
        Ok(())
    }
}

impl ConfigSet {
    /// Adds a `gateway.networking.k8s.io` resource: the mesh route kinds and `ReferenceGrant`
    /// are read; `Gateway`, `GatewayClass` and the other kinds are skipped (Drover is not an
    /// ingress), as is an unknown kind of the group.
    fn add_gateway(
        &mut self,
        origin: Origin,
        value: serde_yaml::Value,
        kind: &str,
        version: &str,
    ) -> Result<(), Problem> {
        let Some((_, versions)) = GATEWAY_VERSIONS.iter().find(|(k, _)| *k == kind) else {
            let at = origin.problem("kind", "");
            tracing::info!(location = %at.location, kind, "skipping Gateway API resource: drover reads only the mesh routes (HTTPRoute, GRPCRoute, TCPRoute) and ReferenceGrant");
            self.skipped.push((at.location, kind.to_string()));
            return Ok(());
        };
        if !versions.contains(&version) {
            return Err(origin.problem(
                "apiVersion",
                format!(
                    "unsupported version {version:?} of {kind} (expected gateway.networking.k8s.io/{})",
                    versions.join(" or ")
                ),
            ));
        }
        let warnings = &mut self.warnings;
        match kind {
            "HTTPRoute" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.http_routes.push(Resource { origin, meta, spec });
            }
            "GRPCRoute" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.grpc_routes.push(Resource { origin, meta, spec });
            }
            "TCPRoute" => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.tcp_routes.push(Resource { origin, meta, spec });
            }
            _ => {
                let (meta, spec) = parse_typed(&origin, value, warnings)?;
                self.reference_grants.push(Resource { origin, meta, spec });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl ConfigSet {
    /// Parses `text` as file `name`, panicking on any problem (tests only).
    pub(crate) fn parse_ok(name: &str, text: &str) -> ConfigSet {
        let mut set = ConfigSet::default();
        let mut problems = Vec::new();
        set.add_text(Arc::new(PathBuf::from(name)), text, &mut problems);
        assert!(problems.is_empty(), "{problems:?}\n{text}");
        set
    }
}

/// Parses `metadata` and `spec` of a resource, naming the failing field; fields under `spec`
/// that the mirror does not know are added to `warnings`.
fn parse_typed<T: serde::de::DeserializeOwned + Default>(
    origin: &Origin,
    value: serde_yaml::Value,
    warnings: &mut Vec<Problem>,
) -> Result<(crd::ObjectMeta, T), Problem> {
    #[derive(Deserialize)]
    struct Typed<T> {
        #[serde(default)]
        metadata: crd::ObjectMeta,
        #[serde(default)]
        spec: Option<T>,
    }
    let mut unknown = Vec::new();
    let mut note = |p: serde_ignored::Path<'_>| unknown.push(field_path(&p));
    let de = serde_ignored::Deserializer::new(value, &mut note);
    let typed: Typed<T> = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        origin.problem(field, strip_location(&e.into_inner().to_string()))
    })?;
    for field in unknown {
        if field.starts_with("spec") {
            warnings.push(origin.problem(
                field,
                "unknown field (ignored; check the spelling against the Istio API)",
            ));
        }
    }
    Ok((typed.metadata, typed.spec.unwrap_or_default()))
}

/// `spec.ports[0].foo` from serde_ignored's path.
fn field_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        P::Map { parent, key } => {
            let parent = field_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            field_path(parent)
        }
    }
}

/// serde_yaml appends "at line L column C"; the location is reported separately.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(path)
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, out)?;
        } else if entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(entry);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (ConfigSet, Vec<Problem>) {
        let mut set = ConfigSet::default();
        let mut problems = Vec::new();
        set.add_text(Arc::new(PathBuf::from("f.yaml")), text, &mut problems);
        (set, problems)
    }

    #[test]
    fn parses_kinds_and_skips_others() {
        let (set, problems) = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example]\n\
             ---\napiVersion: v1\nkind: ConfigMap\n---\napiVersion: networking.istio.io/v1beta1\nkind: Gateway\n\
             ---\napiVersion: networking.istio.io/v1alpha3\nkind: WorkloadEntry\nspec: {address: 198.18.0.1}\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(set.service_entries.len(), 1);
        assert_eq!(set.service_entries[0].spec.hosts, ["a.example"]);
        assert_eq!(set.workload_entries[0].spec.address, "198.18.0.1");
        assert_eq!(
            set.skipped.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
            ["ConfigMap", "Gateway"]
        );
        assert_eq!(set.skipped[0].0.line, 8);
    }

    #[test]
    fn unknown_fields_are_located_warnings() {
        let (set, problems) = load(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r, uid: x}\nspec:\n  host: a\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnection: 1}\n  subsets:\n  - name: v1\n    lables: {a: b}\nstatus: {}\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(set.destination_rules.len(), 1);
        let w: Vec<String> = set.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with(
                "f.yaml:8:13: spec.trafficPolicy.connectionPool.tcp.maxConnection: unknown field"
            ),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("f.yaml:11:5: spec.subsets[0].lables: unknown field"),
            "{w:?}"
        );
    }

    #[test]
    fn type_errors_are_located_with_field_path() {
        let (_, problems) = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec:\n  hosts: [a]\n  ports:\n  - number: eighty\n    name: http\n",
        );
        assert_eq!(problems.len(), 1);
        let p = &problems[0];
        assert_eq!(p.field, "spec.ports[0].number");
        assert_eq!((p.location.line, p.location.col), (6, 5));
        assert!(p.message.contains("invalid type"), "{}", p.message);
        assert!(
            p.to_string()
                .starts_with("f.yaml:6:5: spec.ports[0].number: "),
            "{p}"
        );
    }

    #[test]
    fn alias_bomb_is_refused_at_its_first_alias() {
        let mut text = String::from(
            "kind: Service\n---\nkind: ServiceEntry\nspec:\n  a0: &a0 [x, x, x, x, x, x, x, x, x]\n",
        );
        for i in 1..9 {
            let p = i - 1;
            text.push_str(&format!(
                "  a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let (_, problems) = load(&text);
        let p = problems.last().expect("a problem");
        assert!(p.message.contains("limit exceeded"), "{p}");
        assert_eq!((p.location.line, p.location.col), (6, 12), "{p}");
    }

    #[test]
    fn malformed_yaml_and_unknown_kinds_are_problems() {
        let (_, problems) = load("apiVersion: networking.istio.io/v1\nkind: ServiceEntri\n");
        assert_eq!(problems[0].field, "kind");
        assert_eq!(problems[0].location.line, 2);
        assert!(
            problems[0]
                .message
                .contains("unknown networking.istio.io kind")
        );

        let (_, problems) = load("kind: ServiceEntry\nspec: [\n");
        assert!(
            problems[0].message.starts_with("malformed YAML"),
            "{:?}",
            problems[0]
        );
        assert!(problems[0].location.line > 0);

        let (_, problems) = load("apiVersion: networking.istio.io/v2\nkind: ServiceEntry\n");
        assert!(problems[0].message.contains("unsupported version"));

        let (_, problems) = load("- a\n- b\n");
        assert!(problems[0].message.contains("not a Kubernetes resource"));

        let (_, problems) = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec:\n  resolution: STATICC\n",
        );
        assert_eq!(problems[0].field, "spec.resolution");
        assert!(problems[0].message.contains("unknown variant"));
    }
}
