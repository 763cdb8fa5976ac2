//! The Cosmos DB test server (npm `@vercel/cosmosdb-server`, started by `tests/run.sh` at
//! `IOMT_TEST_COSMOS_URL`), through plain REST calls: it does not check signatures, so these
//! calls carry none (iomt's signing is tested against Microsoft's published example).

use std::time::Duration;

use serde_json::{Value, json};

/// A database on the test server.
#[derive(Debug)]
pub struct Cosmos {
    /// The account endpoint.
    pub endpoint: String,
    /// The database, created by [`Cosmos::from_env`].
    pub database: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Cosmos {
    /// A new database with a random name on the server at `IOMT_TEST_COSMOS_URL`.
    pub fn from_env() -> Self {
        let endpoint = std::env::var("IOMT_TEST_COSMOS_URL").expect(
            "IOMT_TEST_COSMOS_URL is not set: run tests/run.sh, which starts the Cosmos DB test server",
        );
        let cosmos = Cosmos {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            database: format!("db-{:08x}", fastrand::u32(..)),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        cosmos.post("dbs", None, &json!({"id": cosmos.database}));
        cosmos
    }

    fn post(&self, path: &str, partition: Option<&str>, body: &Value) -> Value {
        let url = format!("{}/{path}", self.endpoint);
        self.rt.block_on(async {
            let mut request = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(p) = partition {
                request = request.header("x-ms-documentdb-partitionkey", json!([p]).to_string());
            }
            let response = request
                .send()
                .await
                .expect("the Cosmos DB test server answers");
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            assert!(status.is_success(), "POST {url}: {status} {text}");
            serde_json::from_str(&text).unwrap_or(Value::Null)
        })
    }

    /// Creates a container partitioned on `/{property}`.
    pub fn create_container(&self, container: &str, property: &str) {
        self.post(
            &format!("dbs/{}/colls", self.database),
            None,
            &json!({"id": container, "partitionKey": {"paths": [format!("/{property}")], "kind": "Hash"}}),
        );
    }

    /// Creates a document in partition `partition`.
    pub fn create(&self, container: &str, partition: &str, doc: &Value) {
        self.post(
            &format!("dbs/{}/colls/{container}/docs", self.database),
            Some(partition),
            doc,
        );
    }

    /// Every document of a container, without Cosmos's system properties (`_rid`, `_etag`, …).
    pub fn documents(&self, container: &str) -> Vec<Value> {
        let url = format!(
            "{}/dbs/{}/colls/{container}/docs",
            self.endpoint, self.database
        );
        let page: Value = self.rt.block_on(async {
            let response = self
                .http
                .get(&url)
                .send()
                .await
                .expect("the Cosmos DB test server answers");
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            assert!(status.is_success(), "GET {url}: {status} {text}");
            serde_json::from_str(&text).unwrap()
        });
        page["Documents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let mut d = d.clone();
                if let Some(o) = d.as_object_mut() {
                    o.retain(|k, _| !k.starts_with('_'));
                }
                d
            })
            .collect()
    }
}
