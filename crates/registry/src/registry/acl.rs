//! ACLs: authorizing a request's token, bootstrapping, and policy and token writes.

use super::*;

impl Registry {
    /// Resolves the token secret of a request into what it may do.
    pub fn authorize(&self, secret: Option<&str>) -> Result<Authz, Error> {
        if !self.acl_enabled {
            return Ok(Authz::Management);
        }
        let st = self.read_lock();
        st.acl
            .authorizer(
                secret.filter(|s| !s.is_empty()),
                self.config.acl.default_policy,
            )
            .map_err(|_| Error::AclNotFound)
    }

    pub(crate) fn new_token(
        index: u64,
        secret: Option<String>,
        description: &str,
        management: bool,
    ) -> Token {
        Token {
            accessor_id: uuid(),
            secret_id: secret.unwrap_or_else(uuid),
            description: description.into(),
            policies: if management {
                vec![PolicyLink {
                    id: MANAGEMENT_POLICY_ID.into(),
                    name: "global-management".into(),
                }]
            } else {
                vec![]
            },
            local: false,
            management,
            create_index: index,
            modify_index: index,
        }
    }

    /// Creates the configured initial management token if it does not exist yet.
    pub async fn ensure_initial_management(&self) -> Result<(), Error> {
        let Some(secret) = self.config.acl.initial_management.clone() else {
            return Ok(());
        };
        self.commit(|st, index| {
            if st.acl.token_by_secret(&secret).is_some() {
                return Ok((vec![], ()));
            }
            let token = Self::new_token(
                index,
                Some(secret.clone()),
                "Initial Management Token",
                true,
            );
            Ok((
                vec![
                    Op::Acl(AclOp::Bootstrapped),
                    Op::Acl(AclOp::PutToken(token)),
                ],
                (),
            ))
        })
        .await
    }

    /// `PUT /v1/acl/bootstrap`: once only.
    pub async fn acl_bootstrap(&self) -> Result<Token, Error> {
        if !self.acl_enabled {
            return Err(Error::bad("ACL support disabled"));
        }
        self.commit(|st, index| {
            if st.acl.bootstrapped {
                return Err(Error::denied(format!(
                    "ACL bootstrap no longer allowed (reset index: {})",
                    st.index
                )));
            }
            let token = Self::new_token(index, None, "Bootstrap Token (Global Management)", true);
            Ok((
                vec![
                    Op::Acl(AclOp::Bootstrapped),
                    Op::Acl(AclOp::PutToken(token.clone())),
                ],
                token,
            ))
        })
        .await
    }

    fn require_acl(&self, authz: &Authz, need: Level) -> Result<(), Error> {
        if !self.acl_enabled {
            return Err(Error::bad("ACL support disabled"));
        }
        let got = authz.acl_level();
        if got == Level::Deny || got < need {
            return Err(Error::denied(
                format!("token lacks acl:{need:?}").to_lowercase(),
            ));
        }
        Ok(())
    }

    pub async fn acl_put_policy(
        &self,
        id: Option<String>,
        name: String,
        description: String,
        rules: String,
        authz: &Authz,
    ) -> Result<Policy, Error> {
        self.require_acl(authz, Level::Write)?;
        tessera_core::validate_service_name("policy name (Name)", &name)?;
        crate::acl::Rules::parse(&rules).map_err(|e| Error::bad(format!("Rules: {e}")))?;
        self.commit(|st, index| {
            let existing = match &id {
                Some(id) => Some(
                    st.acl
                        .policies
                        .get(id)
                        .ok_or_else(|| Error::NotFound(format!("Unknown policy ID {id:?}")))?,
                ),
                None => None,
            };
            if let Some(other) = st.acl.policy_by_name(&name)
                && Some(&other.id) != id.as_ref()
            {
                return Err(Error::bad(format!(
                    "Invalid Policy: A Policy with Name {name:?} already exists"
                )));
            }
            let policy = Policy {
                id: existing.map(|p| p.id.clone()).unwrap_or_else(uuid),
                name: name.clone(),
                description: description.clone(),
                rules: rules.clone(),
                create_index: existing.map(|p| p.create_index).unwrap_or(index),
                modify_index: index,
            };
            Ok((vec![Op::Acl(AclOp::PutPolicy(policy.clone()))], policy))
        })
        .await
    }

    pub async fn acl_delete_policy(&self, id: &str, authz: &Authz) -> Result<(), Error> {
        self.require_acl(authz, Level::Write)?;
        self.commit(|st, _| {
            let ops = if st.acl.policies.contains_key(id) {
                vec![Op::Acl(AclOp::DeletePolicy(id.to_owned()))]
            } else {
                vec![]
            };
            Ok((ops, ()))
        })
        .await
    }

    pub async fn acl_put_token(
        &self,
        accessor: Option<String>,
        secret: Option<String>,
        description: String,
        policies: Vec<PolicyLink>,
        authz: &Authz,
    ) -> Result<Token, Error> {
        self.require_acl(authz, Level::Write)?;
        self.commit(|st, index| {
            let mut links = Vec::new();
            for p in &policies {
                let found = if !p.id.is_empty() {
                    if p.id == MANAGEMENT_POLICY_ID {
                        links.push(PolicyLink {
                            id: p.id.clone(),
                            name: "global-management".into(),
                        });
                        continue;
                    }
                    st.acl.policies.get(&p.id)
                } else {
                    st.acl.policy_by_name(&p.name)
                };
                let found = found.ok_or_else(|| {
                    Error::bad(format!(
                        "Invalid Policy: no policy with ID {:?} or Name {:?}",
                        p.id, p.name
                    ))
                })?;
                links.push(PolicyLink {
                    id: found.id.clone(),
                    name: found.name.clone(),
                });
            }
            let existing = match &accessor {
                Some(a) => st.acl.tokens.get(a),
                None => None,
            };
            if let Some(s) = &secret
                && st
                    .acl
                    .token_by_secret(s)
                    .is_some_and(|t| Some(&t.accessor_id) != accessor.as_ref())
            {
                return Err(Error::bad("Invalid Token: SecretID is already in use"));
            }
            let mut token = Self::new_token(index, secret.clone(), &description, false);
            if let Some(a) = &accessor {
                token.accessor_id = a.clone();
            }
            if let Some(e) = existing {
                token.secret_id = secret.clone().unwrap_or_else(|| e.secret_id.clone());
                token.create_index = e.create_index;
                token.management = e.management && links.is_empty();
            }
            token.policies = links;
            Ok((vec![Op::Acl(AclOp::PutToken(token.clone()))], token))
        })
        .await
    }

    pub async fn acl_delete_token(&self, accessor: &str, authz: &Authz) -> Result<(), Error> {
        self.require_acl(authz, Level::Write)?;
        self.commit(|st, _| {
            let ops = if st.acl.tokens.contains_key(accessor) {
                vec![Op::Acl(AclOp::DeleteToken(accessor.to_owned()))]
            } else {
                vec![]
            };
            Ok((ops, ()))
        })
        .await
    }

    pub fn acl_read_check(&self, authz: &Authz) -> Result<(), Error> {
        self.require_acl(authz, Level::Read)
    }
}
