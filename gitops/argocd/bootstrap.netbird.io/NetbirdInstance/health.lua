-- Argo CD health check for bootstrap.netbird.io/NetbirdInstance.
-- Install: argocd-cm, key resource.customizations.health.bootstrap.netbird.io_NetbirdInstance
local hs = {}
if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted"
  return hs
end
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "reconciling is suspended (spec.suspend)"
  return hs
end
if obj.status == nil or obj.status.observedGeneration == nil
    or obj.metadata.generation ~= obj.status.observedGeneration then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local conditions = {}
for _, c in ipairs(obj.status.conditions or {}) do
  conditions[c.type] = c
end
local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end
if conditions.Stalled ~= nil and conditions.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(conditions.Stalled)
  return hs
end
if conditions.Ready ~= nil and conditions.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(conditions.Ready)
  return hs
end
hs.status = "Progressing"
local c = conditions.Reconciling or conditions.Ready
if c ~= nil then
  hs.message = describe(c)
else
  hs.message = "waiting for the operator"
end
return hs
