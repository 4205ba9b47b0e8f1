//! The configuration of `serve`: a TOML file, the environment and the command line, in that
//! order of precedence (a flag beats its environment variable beats the file beats the
//! default). [`ServeOptions`] is both the clap flag set and the file format (its keys are
//! the long flag names); [`ServeOptions::resolve`] applies defaults and checks the
//! combination once, into a [`ServeConfig`].

use super::admission::{Shares, TenantLimits};
use super::tenant::Tenant;
use super::tls::TlsFiles;
use super::{ListenAddr, Protocol};
use crate::units::{parse_duration, parse_size};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Smallest and largest `max-message-size`.
const MESSAGE_SIZE_RANGE: (u64, u64) = (64 * 1024, 2 * 1024 * 1024 * 1024 - 1);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Idle VMs each hold their guest memory: a pool beyond this is a typo, not a plan.
const MAX_POOL_SIZE: usize = 256;

/// Configured tenants beyond this are a generated file, not a plan (each is a metric label).
const MAX_TENANTS: usize = 256;
/// Largest weight: a ratio beyond this is indistinguishable from "always first".
const MAX_WEIGHT: u32 = 1000;

/// One tenant's limits in the config file (`[tenants.<name>]`, `[tenant-defaults]`); what
/// is left out comes from `[tenant-defaults]`, then from the host-wide `max-vms` and
/// `max-queue` (weight 1).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TenantOptions {
    /// VMs the tenant may run at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vms: Option<usize>,
    /// Requests the tenant may have waiting; beyond, RESOURCE_EXHAUSTED naming this key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    /// Its share of the VMs when they are short, relative to the others' (1 to 1000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Bytes it may add to the store per hour (uploads, and its builds' outputs after the
    /// fact), e.g. "10G"; "unlimited" lifts a default [default: unlimited].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_bytes_per_hour: Option<String>,
    /// Pins it may hold on the embedded store (`store pin --addr`) [default: 10000].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pins: Option<usize>,
}

/// The word that lifts an upload limit set in `[tenant-defaults]`.
const UNLIMITED: &str = "unlimited";

impl TenantOptions {
    fn resolve(&self, lower: TenantLimits, key: &str) -> Result<TenantLimits, ConfigError> {
        let upload_bytes_per_hour = match self.upload_bytes_per_hour.as_deref() {
            None => lower.upload_bytes_per_hour,
            Some(UNLIMITED) => None,
            Some(size) => Some(parse_size(size).map_err(|e| {
                invalid(
                    "tenants",
                    format!("{key}.upload-bytes-per-hour: {e} (or \"{UNLIMITED}\")"),
                )
            })?),
        };
        let limits = TenantLimits {
            max_vms: self.max_vms.unwrap_or(lower.max_vms),
            max_queue: self.max_queue.unwrap_or(lower.max_queue),
            weight: self.weight.unwrap_or(lower.weight),
            upload_bytes_per_hour,
            max_pins: self.max_pins.unwrap_or(lower.max_pins),
        };
        if limits.max_vms == 0 {
            return Err(invalid(
                "tenants",
                format!("{key}.max-vms must be at least 1"),
            ));
        }
        if !(1..=MAX_WEIGHT).contains(&limits.weight) {
            return Err(invalid(
                "tenants",
                format!("{key}.weight must be 1 to {MAX_WEIGHT}"),
            ));
        }
        Ok(limits)
    }
}

/// The options of `serve` (flags, environment, and the keys of the TOML config file).
#[derive(
    Clone, Debug, Default, PartialEq, Eq, clap::Args, serde::Deserialize, serde::Serialize,
)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeOptions {
    /// Where to listen: host:port, or unix:/abs/path.sock [default: [::]:8000].
    #[arg(long, env = "TVIX_BUILD_VM_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The layout of tvix.build.v1.BuildService/DoBuild [default: seed]; snix.build.v1 is
    /// served beside either.
    #[arg(long, value_enum, env = "TVIX_BUILD_VM_PROTOCOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// VMs running at once [default: one per core and per GiB of VM memory, the fewer].
    #[arg(long, env = "TVIX_BUILD_VM_MAX_VMS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vms: Option<usize>,
    /// VMs kept booted ahead of requests, each used for one build of the default shape
    /// (--vm-memory, no /dev/kvm, no network) and then replaced; they come on top of
    /// max-vms [default: 0, no pool].
    #[arg(long, env = "TVIX_BUILD_VM_POOL_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// Requests that may wait for a VM; beyond, RESOURCE_EXHAUSTED [default: 16].
    #[arg(long, env = "TVIX_BUILD_VM_MAX_QUEUE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    /// On SIGTERM/SIGINT, how long running builds may go on before they are cancelled
    /// [default: 60s].
    #[arg(long, env = "TVIX_BUILD_VM_GRACE_PERIOD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<String>,
    /// Free space the embedded store's filesystem keeps, e.g. 2G: below it, new uploads
    /// and builds get RESOURCE_EXHAUSTED and /readyz says not ready; 0 turns it off
    /// [default: 1G].
    #[arg(long, env = "TVIX_BUILD_VM_MIN_FREE_SPACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_space: Option<String>,
    /// How often the embedded store is garbage collected, e.g. 1h; 0 turns it off
    /// [default: 1h] (see docs/serve.md, "Garbage collection").
    #[arg(long, env = "TVIX_BUILD_VM_GC_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_interval: Option<String>,
    /// The GC keeps anything uploaded within this long [default: 1h].
    #[arg(long, env = "TVIX_BUILD_VM_GC_GRACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_grace: Option<String>,
    /// The GC keeps the inputs, outputs and logs of builds finished within this long
    /// [default: 168h].
    #[arg(long, env = "TVIX_BUILD_VM_KEEP_FOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_for: Option<String>,
    /// Largest gRPC message received or sent, e.g. 64M [default: 64M].
    #[arg(long, env = "TVIX_BUILD_VM_MAX_MESSAGE_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key, the listener speaks TLS.
    #[arg(long, env = "TVIX_BUILD_VM_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "TVIX_BUILD_VM_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS; clients without a
    /// valid certificate are refused.
    #[arg(long, env = "TVIX_BUILD_VM_TLS_CLIENT_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://<addr>/metrics (host:port); off unless given.
    #[arg(long, env = "TVIX_BUILD_VM_METRICS_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Grant constraints.network_access (2024 layout): the VM gets a NATed network device.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", env = "TVIX_BUILD_VM_ALLOW_NETWORK")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_network: Option<bool>,
    /// A static shell on this host (e.g. /bin/busybox) offered as /bin/sh to requests with
    /// constraints.provide_bin_sh (2024 layout); refused without.
    #[arg(long, env = "TVIX_BUILD_VM_BIN_SH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bin_sh: Option<PathBuf>,
    /// Bearer tokens: lines of `<tenant> <sha256 of the token, hex>`; reread on SIGHUP.
    #[arg(long, env = "TVIX_BUILD_VM_TOKENS", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<PathBuf>,
    /// Refuse callers that prove nothing (plain TCP without a token) with UNAUTHENTICATED;
    /// without, they are the tenant "anonymous".
    #[arg(long, num_args = 0..=1, default_missing_value = "true", env = "TVIX_BUILD_VM_REQUIRE_AUTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_auth: Option<bool>,
    /// Limits of unlisted tenants (config file only).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_defaults: Option<TenantOptions>,
    /// Limits by tenant name (config file only): `[tenants.<name>]`.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants: Option<BTreeMap<String, TenantOptions>>,
}

/// The checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    pub listen: ListenAddr,
    pub protocol: Protocol,
    pub max_vms: usize,
    pub pool_size: usize,
    pub max_queue: usize,
    pub grace_period: Duration,
    /// Bytes the embedded store's filesystem keeps free (0: no floor).
    pub min_free_bytes: u64,
    /// How often the embedded store is collected (zero: never).
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    pub keep_for: Duration,
    pub max_message_bytes: usize,
    pub tls: Option<TlsFiles>,
    pub metrics_listen: Option<SocketAddr>,
    pub allow_network: bool,
    pub bin_sh: Option<PathBuf>,
    pub tokens: Option<PathBuf>,
    pub require_auth: bool,
    /// Each tenant's limits.
    pub shares: Shares,
}

macro_rules! overlay {
    ($hi:expr, $lo:expr, $($field:ident),+) => {
        ServeOptions { $($field: $hi.$field.or($lo.$field)),+ }
    };
}

impl ServeOptions {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// `self` where set, else `lower`.
    pub fn over(self, lower: ServeOptions) -> ServeOptions {
        overlay!(
            self,
            lower,
            listen,
            protocol,
            max_vms,
            pool_size,
            max_queue,
            grace_period,
            min_free_space,
            gc_interval,
            gc_grace,
            keep_for,
            max_message_size,
            tls_cert,
            tls_key,
            tls_client_ca,
            metrics_listen,
            allow_network,
            bin_sh,
            tokens,
            require_auth,
            tenant_defaults,
            tenants
        )
    }

    /// Applies the defaults (`default_max_vms` for this host) and checks every option and
    /// their combination.
    pub fn resolve(self, default_max_vms: usize) -> Result<ServeConfig, ConfigError> {
        let listen: ListenAddr = self
            .listen
            .as_deref()
            .unwrap_or("[::]:8000")
            .parse()
            .map_err(|e: super::ServerError| invalid("listen", e.to_string()))?;
        let grace_period = parse_duration(self.grace_period.as_deref().unwrap_or("60s"))
            .map_err(|e| invalid("grace-period", e))?;
        let min_free_bytes = parse_size(self.min_free_space.as_deref().unwrap_or("1G"))
            .map_err(|e| invalid("min-free-space", e))?;
        let duration = |v: &Option<String>, default, key| {
            parse_duration(v.as_deref().unwrap_or(default)).map_err(|e| invalid(key, e))
        };
        let gc_interval = duration(&self.gc_interval, "1h", "gc-interval")?;
        let gc_grace = duration(&self.gc_grace, "1h", "gc-grace")?;
        let keep_for = duration(&self.keep_for, "168h", "keep-for")?;
        let max_message = parse_size(self.max_message_size.as_deref().unwrap_or("64M"))
            .map_err(|e| invalid("max-message-size", e))?;
        if !(MESSAGE_SIZE_RANGE.0..=MESSAGE_SIZE_RANGE.1).contains(&max_message) {
            return Err(invalid(
                "max-message-size",
                format!(
                    "{max_message} bytes is outside {}..={} bytes",
                    MESSAGE_SIZE_RANGE.0, MESSAGE_SIZE_RANGE.1
                ),
            ));
        }
        let max_vms = self.max_vms.unwrap_or(default_max_vms);
        if max_vms == 0 {
            return Err(invalid("max-vms", "must be at least 1"));
        }
        let pool_size = self.pool_size.unwrap_or(0);
        if pool_size > MAX_POOL_SIZE {
            return Err(invalid(
                "pool-size",
                format!("{pool_size} is more than {MAX_POOL_SIZE}"),
            ));
        }
        let metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid("metrics-listen", format!("{a:?}: {e}")))
            })
            .transpose()?;
        let max_queue = self.max_queue.unwrap_or(16);
        let shares = shares(
            Shares::open(max_vms, max_queue).default,
            self.tenant_defaults.as_ref(),
            self.tenants.as_ref(),
        )?;
        let config = ServeConfig {
            listen,
            protocol: self.protocol.unwrap_or_default(),
            max_vms,
            pool_size,
            max_queue,
            grace_period,
            min_free_bytes,
            gc_interval,
            gc_grace,
            keep_for,
            max_message_bytes: usize::try_from(max_message)
                .map_err(|_| invalid("max-message-size", "too large for this platform"))?,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                }),
                (None, None) if self.tls_client_ca.is_some() => {
                    return Err(invalid(
                        "tls-client-ca",
                        "mutual TLS needs tls-cert and tls-key as well",
                    ))
                }
                (None, None) => None,
                (Some(_), None) => {
                    return Err(invalid("tls-key", "tls-cert is set but tls-key is not"))
                }
                (None, Some(_)) => {
                    return Err(invalid("tls-cert", "tls-key is set but tls-cert is not"))
                }
            },
            metrics_listen,
            allow_network: self.allow_network.unwrap_or(false),
            bin_sh: self.bin_sh,
            tokens: self.tokens,
            require_auth: self.require_auth.unwrap_or(false),
            shares,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Each tenant's limits: its own table over `[tenant-defaults]` over the host's.
fn shares(
    host: TenantLimits,
    defaults: Option<&TenantOptions>,
    tenants: Option<&BTreeMap<String, TenantOptions>>,
) -> Result<Shares, ConfigError> {
    let default = defaults
        .cloned()
        .unwrap_or_default()
        .resolve(host, "tenant-defaults")?;
    let tenants = tenants.cloned().unwrap_or_default();
    if tenants.len() > MAX_TENANTS {
        return Err(invalid(
            "tenants",
            format!("{} tenants; at most {MAX_TENANTS}", tenants.len()),
        ));
    }
    let mut out = BTreeMap::new();
    for (name, t) in &tenants {
        Tenant::new(name).map_err(|e| invalid("tenants", e.to_string()))?;
        out.insert(
            name.clone(),
            t.resolve(default, &format!("tenants.{name}"))?,
        );
    }
    Ok(Shares {
        default,
        tenants: out,
    })
}

impl ServeConfig {
    /// The checks that involve more than one option.
    fn validate(&self) -> Result<(), ConfigError> {
        let tcp = matches!(self.listen, ListenAddr::Tcp(_));
        let client_certs = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if self.require_auth && tcp && self.tokens.is_none() && !client_certs {
            return Err(invalid(
                "require-auth",
                "on TCP nobody could authenticate: give tokens or tls-client-ca",
            ));
        }
        if let (ListenAddr::Tcp(grpc), Some(metrics)) = (&self.listen, &self.metrics_listen) {
            if grpc.port() == metrics.port() && grpc.port() != 0 {
                return Err(invalid(
                    "metrics-listen",
                    format!("{metrics} uses the port of listen ({grpc})"),
                ));
            }
        }
        if let Some(sh) = &self.bin_sh {
            if !sh.is_absolute() {
                return Err(invalid(
                    "bin-sh",
                    format!("{} is not absolute", sh.display()),
                ));
            }
        }
        Ok(())
    }

    /// The configuration as a complete config file (what `--print-config` prints).
    pub fn to_options(&self) -> ServeOptions {
        let (tls_cert, tls_key, tls_client_ca) = match &self.tls {
            Some(t) => (
                Some(t.cert.clone()),
                Some(t.key.clone()),
                t.client_ca.clone(),
            ),
            None => (None, None, None),
        };
        ServeOptions {
            listen: Some(self.listen.to_string()),
            protocol: Some(self.protocol),
            max_vms: Some(self.max_vms),
            pool_size: Some(self.pool_size),
            max_queue: Some(self.max_queue),
            grace_period: Some(format!("{}s", self.grace_period.as_secs())),
            min_free_space: Some(self.min_free_bytes.to_string()),
            gc_interval: Some(format!("{}ms", self.gc_interval.as_millis())),
            gc_grace: Some(format!("{}ms", self.gc_grace.as_millis())),
            keep_for: Some(format!("{}ms", self.keep_for.as_millis())),
            max_message_size: Some(self.max_message_bytes.to_string()),
            tls_cert,
            tls_key,
            tls_client_ca,
            metrics_listen: self.metrics_listen.map(|a| a.to_string()),
            allow_network: Some(self.allow_network),
            bin_sh: self.bin_sh.clone(),
            tokens: self.tokens.clone(),
            require_auth: Some(self.require_auth),
            tenant_defaults: Some(limits_options(self.shares.default)),
            tenants: (!self.shares.tenants.is_empty()).then(|| {
                self.shares
                    .tenants
                    .iter()
                    .map(|(name, l)| (name.clone(), limits_options(*l)))
                    .collect()
            }),
        }
    }
}

fn limits_options(l: TenantLimits) -> TenantOptions {
    TenantOptions {
        max_vms: Some(l.max_vms),
        max_queue: Some(l.max_queue),
        weight: Some(l.weight),
        upload_bytes_per_hour: Some(
            l.upload_bytes_per_hour
                .map_or_else(|| UNLIMITED.to_owned(), |n| n.to_string()),
        ),
        max_pins: Some(l.max_pins),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_and_flags_layer_and_defaults_fill_in() {
        let file: ServeOptions = toml::from_str(
            r#"
            listen = "unix:/run/tbv.sock"
            protocol = "tvix-2024"
            max-queue = 3
            grace-period = "5m"
            "#,
        )
        .unwrap();
        let flags = ServeOptions {
            max_queue: Some(7),
            ..Default::default()
        };
        let c = flags.over(file).resolve(2).unwrap();
        assert_eq!(c.listen, ListenAddr::Unix("/run/tbv.sock".into()));
        assert_eq!(c.protocol, Protocol::Tvix2024);
        assert_eq!(c.max_queue, 7, "the flag wins over the file");
        assert_eq!(c.max_vms, 2, "the host default");
        assert_eq!(c.grace_period, Duration::from_secs(300));
        assert_eq!(c.max_message_bytes, 64 << 20);
        assert!(c.tls.is_none() && !c.allow_network);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = toml::from_str::<ServeOptions>("max-vm = 3").unwrap_err();
        assert!(e.to_string().contains("max-vm"), "{e}");
        let bad = |o: ServeOptions, key: &str| {
            let e = o.resolve(1).unwrap_err();
            assert!(e.to_string().starts_with(key), "{key}: {e}");
        };
        bad(
            ServeOptions {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
            "listen",
        );
        bad(
            ServeOptions {
                max_vms: Some(0),
                ..Default::default()
            },
            "max-vms",
        );
        bad(
            ServeOptions {
                max_message_size: Some("1K".into()),
                ..Default::default()
            },
            "max-message-size",
        );
        bad(
            ServeOptions {
                grace_period: Some("soon".into()),
                ..Default::default()
            },
            "grace-period",
        );
        bad(
            ServeOptions {
                tls_cert: Some("/c.pem".into()),
                ..Default::default()
            },
            "tls-key",
        );
        bad(
            ServeOptions {
                tls_client_ca: Some("/ca.pem".into()),
                ..Default::default()
            },
            "tls-client-ca",
        );
        bad(
            ServeOptions {
                bin_sh: Some("busybox".into()),
                ..Default::default()
            },
            "bin-sh",
        );
        bad(
            ServeOptions {
                listen: Some("127.0.0.1:9000".into()),
                metrics_listen: Some("127.0.0.1:9000".into()),
                ..Default::default()
            },
            "metrics-listen",
        );
    }

    #[test]
    fn tenants_inherit_defaults_and_bad_ones_are_named() {
        let file: ServeOptions = toml::from_str(
            r#"
            max-vms = 4
            max-queue = 20
            tokens = "/etc/tbv/tokens"
            require-auth = true
            [tenant-defaults]
            max-vms = 2
            upload-bytes-per-hour = "10G"
            max-pins = 100
            [tenants.ci]
            weight = 3
            max-pins = 5
            max-queue = 50
            upload-bytes-per-hour = "unlimited"
            [tenants.alice]
            max-vms = 1
            "#,
        )
        .unwrap();
        let c = file.resolve(1).unwrap();
        assert!(c.require_auth);
        let l = |n: &str| c.shares.limits(&Tenant::new(n).unwrap());
        assert_eq!(
            l("ci"),
            TenantLimits {
                max_vms: 2,
                max_queue: 50,
                weight: 3,
                upload_bytes_per_hour: None,
                max_pins: 5,
            }
        );
        assert_eq!(
            l("alice"),
            TenantLimits {
                max_vms: 1,
                max_queue: 20,
                weight: 1,
                upload_bytes_per_hour: Some(10 << 30),
                max_pins: 100,
            }
        );
        assert_eq!(l("bob"), c.shares.default);
        assert_eq!(c.shares.label(&Tenant::new("bob").unwrap()), "other");

        let bad = |text: &str, needle: &str| {
            let o: ServeOptions = toml::from_str(text).unwrap();
            let e = o.resolve(1).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        };
        bad("[tenants.\"a b\"]\nweight = 1", "tenant name");
        bad("[tenants.a]\nweight = 0", "tenants.a.weight");
        bad("[tenants.a]\nmax-vms = 0", "tenants.a.max-vms");
        bad("[tenant-defaults]\nweight = 5000", "tenant-defaults.weight");
        bad(
            "[tenants.a]\nupload-bytes-per-hour = \"lots\"",
            "tenants.a.upload-bytes-per-hour",
        );
        bad(
            "require-auth = true\nlisten = \"127.0.0.1:1\"",
            "require-auth",
        );
        assert!(toml::from_str::<ServeOptions>("[tenants.a]\nmax-vm = 1").is_err());
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let c = ServeOptions {
            tokens: Some("/etc/tbv/tokens".into()),
            tenants: Some(BTreeMap::from([(
                "ci".to_owned(),
                TenantOptions {
                    weight: Some(2),
                    upload_bytes_per_hour: Some("1G".into()),
                    ..Default::default()
                },
            )])),
            tls_cert: Some("/etc/tbv/cert.pem".into()),
            tls_key: Some("/etc/tbv/key.pem".into()),
            metrics_listen: Some("127.0.0.1:9100".into()),
            ..Default::default()
        }
        .resolve(4)
        .unwrap();
        let text = toml::to_string(&c.to_options()).unwrap();
        let back: ServeOptions = toml::from_str(&text).unwrap();
        assert_eq!(back.resolve(1).unwrap(), c, "{text}");
    }
}
