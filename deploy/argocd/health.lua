-- Argo CD health check for umstore.io/UserMetadataStore (docs/argocd.md).
--
-- Argo CD runs it in gopher-lua (Lua 5.1) with only the base, table and package
-- libraries and a restricted os, unless useOpenLibs is set: no string library, so
-- no string.* and no s:method(). crds/tests/argocd_health.rs runs it that way.
--
-- First match wins:
--   1. being deleted                                    Progressing
--   2. no status yet                                    Progressing
--   3. status.observedGeneration < metadata.generation  Progressing (the status is
--      about an older spec, so nothing below is read)
--   4. something a person has to fix                    Degraded
--   5. migrations waiting for approval                  Suspended
--   6. a tier promotion under way                       Progressing
--   7. Ready True                                       Healthy
--   8. anything else                                    Progressing

local hs = {}

-- Reasons that do not clear without a person changing something: the spec, the
-- image, the database or an approval. Any other reason is a wait that clears.
local needs_a_person = {
  InvalidSpec = true,
  Malformed = true,
  DemotionRefused = true,
  MigrationApprovalUnknown = true,
  MigrationFailed = true,
  MigrationRefused = true,
  ApplyRejected = true,
}

-- The pipeline's step conditions, in order. A reconcile that stops at one step
-- leaves the later steps' conditions as an earlier reconcile wrote them.
local steps = { "Provisioned", "Bootstrapped", "SchemaReady", "Distributed" }

local function say(c)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return c.type .. " is " .. tostring(c.status)
end

local metadata = obj.metadata or {}
local status = obj.status

if metadata.deletionTimestamp ~= nil or (status ~= nil and status.phase == "Deleting") then
  hs.status = "Progressing"
  hs.message = "being deleted"
  return hs
end

local byType = {}
if status ~= nil and status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type ~= nil then
      byType[c.type] = c
    end
  end
end
local ready = byType["Ready"]

if status == nil or (status.phase == nil and ready == nil) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to report status"
  return hs
end

local observed = tonumber(status.observedGeneration)
local generation = tonumber(metadata.generation)
if observed ~= nil and generation ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(metadata.generation)
  return hs
end

-- Where the pipeline stopped: Ready, and the first step condition that is False.
local blockers = {}
if ready ~= nil and ready.status == "False" then
  table.insert(blockers, ready)
end
for _, t in ipairs(steps) do
  local c = byType[t]
  if c ~= nil and c.status == "False" then
    table.insert(blockers, c)
    break
  end
end

local degraded = byType["Degraded"]
if degraded ~= nil and degraded.status ~= "True" then
  degraded = nil
end
local serving = ""
if ready ~= nil and ready.status == "True" then
  serving = " (still serving: Ready is True)"
end

for _, c in ipairs(blockers) do
  if needs_a_person[c.reason] then
    hs.status = "Degraded"
    hs.message = say(c)
    if degraded ~= nil and degraded.message ~= c.message then
      hs.message = hs.message .. "; " .. say(degraded)
    end
    return hs
  end
end
if degraded ~= nil then
  hs.status = "Degraded"
  hs.message = say(degraded) .. serving
  return hs
end
if status.phase == "Invalid" then
  hs.status = "Degraded"
  if ready ~= nil then
    hs.message = say(ready)
  else
    hs.message = "the spec cannot be realised"
  end
  return hs
end

for _, c in ipairs(blockers) do
  if c.reason == "MigrationsPending" then
    hs.status = "Suspended"
    hs.message = "waiting for approval: " .. say(c)
    -- status.migrations.pending lists the versions (operators that read the
    -- approval annotation write it); approving the highest applies them all.
    -- Without it, the condition's message is all there is.
    local pending = {}
    local highest = nil
    if status.migrations ~= nil and status.migrations.pending ~= nil then
      for _, v in ipairs(status.migrations.pending) do
        table.insert(pending, tostring(v))
        if highest == nil or tonumber(v) > tonumber(highest) then
          highest = v
        end
      end
    end
    if highest ~= nil then
      local ns = ""
      if metadata.namespace ~= nil then
        ns = "-n " .. metadata.namespace .. " "
      end
      hs.message = "migrations " .. table.concat(pending, ", ")
        .. " are waiting for approval (spec.migrations.policy is Manual): approve them"
        .. " with the annotation umstore.io/approve-migrations: \"" .. tostring(highest)
        .. "\" on the store, in the manifest Argo CD syncs or with kubectl " .. ns
        .. "annotate --overwrite ums " .. tostring(metadata.name)
        .. " umstore.io/approve-migrations=" .. tostring(highest)
        .. " (a lower version applies up to it), or set the policy to Auto"
    end
    return hs
  end
end

local promoting = byType["Promoting"]
if promoting ~= nil and promoting.status == "True" then
  hs.status = "Progressing"
  hs.message = say(promoting)
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(ready)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = say(ready)
else
  hs.message = "waiting for the Ready condition"
end
return hs
