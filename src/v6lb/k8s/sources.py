"""Where each AWS and Kubernetes rule comes from: a URL and a short quote, declared once.

Every rule :mod:`v6lb.k8s.aws` and :mod:`v6lb.k8s.pitfalls` apply carries one of these
:class:`Source` values, and docs/kubernetes.md prints the same table. A rule for which no
public text was found says so with :data:`NO_SOURCE` (or a :class:`Source` whose quote
says what is missing) instead of citing something that does not say it.

The quotes were looked up in stored copies of the public pages (the AWS Load Balancer
Controller's docs and source, the Elastic Load Balancing user guides, the Kubernetes API
and docs) and are kept short; the URL is the page to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["NO_SOURCE", "Source"]


@dataclass(frozen=True, slots=True)
class Source:
    """A public page and the words on it a rule rests on."""

    url: str
    quote: str

    @property
    def found(self) -> bool:
        return bool(self.url)

    def __str__(self) -> str:
        if not self.url:
            return self.quote
        return f'{self.url} ("{self.quote}")'


NO_SOURCE: Final = Source("", "no source found")

_LBC: Final = "https://kubernetes-sigs.github.io/aws-load-balancer-controller/latest"
_LBC_SVC: Final = f"{_LBC}/guide/service/annotations/"
_LBC_ING: Final = f"{_LBC}/guide/ingress/annotations/"
_LBC_NLB: Final = f"{_LBC}/guide/service/nlb/"
_LBC_CONF: Final = f"{_LBC}/deploy/configurations/"
_LBC_SRC: Final = "https://github.com/kubernetes-sigs/aws-load-balancer-controller/blob/main"
_NLB_TGA: Final = (
    "https://docs.aws.amazon.com/elasticloadbalancing/latest/network/"
    "edit-target-group-attributes.html"
)

# --- which controller reconciles a Service ---------------------------------------------
LB_TYPE = Source(
    f"{_LBC_SVC}#lb-type",
    "This controller reconciles those service resources with this annotation set to "
    "either nlb-ip or external.",
)
LEGACY = Source(
    f"{_LBC_SVC}#legacy-cloud-provider",
    "For all other values of the annotation, the legacy cloud provider will handle the service.",
)
IN_TREE_TYPE = Source(
    "https://cloud-provider-aws.sigs.k8s.io/service_controller/",
    "The only valid value is nlb. Leaving this field blank is equivalent to selecting ELB.",
)
IN_TREE_INTERNAL = Source(
    IN_TREE_TYPE.url,
    "aws-load-balancer-internal: Indicates that the load balancer should be internal. "
    "(no source states the default scheme; without it the load balancer is not internal)",
)
IN_TREE_NO_IPV6 = Source(
    IN_TREE_TYPE.url,
    "no source found for IPv6 on the in-tree provider's load balancers: its annotation "
    "table has no IP address type",
)
CLB_IPV4_ONLY = Source(
    "https://docs.aws.amazon.com/elasticloadbalancing/latest/classic/"
    "elb-internet-facing-load-balancers.html",
    "Load balancers in a VPC support IPv4 addresses only.",
)
LB_CLASS = Source(
    f"{_LBC_CONF}#controller-command-line-flags",
    "load-balancer-class: service.k8s.aws/nlb. Name of the load balancer class specified in "
    "service spec.loadBalancerClass reconciled by this controller",
)
# --- NLB settings ------------------------------------------------------------------------
TARGET_TYPE_CLASS = Source(
    f"{_LBC_SVC}#nlb-target-type",
    "If you configure spec.loadBalancerClass, the controller defaults to instance target type",
)
TARGET_TYPE_DEFAULT = Source(
    f"{_LBC_CONF}#controller-command-line-flags",
    "default-target-type: instance. Default target type for Ingresses and Services - ip, instance",
)
TARGET_TYPE_VALUES = Source(
    f"{_LBC_SVC}#nlb-target-type",
    "specifies the target type to configure for NLB. You can choose between instance and ip.",
)
NLB_IP_COMPAT = Source(
    f"{_LBC_NLB}",
    "service.beta.kubernetes.io/aws-load-balancer-type: nlb-ip ... the controller will "
    "provision NLB in IP mode. With this, the ...nlb-target-type annotation gets ignored.",
)
INSTANCE_NODEPORT = Source(
    f"{_LBC_SVC}#nlb-target-type",
    "If the NodePort is not allocated for a service port, the controller will fail to "
    "reconcile instance mode NLB.",
)
NLB_SCHEME = Source(
    f"{_LBC_SVC}#lb-scheme",
    "Valid values are internal, internet-facing. If not specified, default is internal.",
)
NLB_INTERNAL_DEPRECATED = Source(
    f"{_LBC_SVC}#lb-internal",
    "It will be supported, but in case of ties, the aws-load-balancer-scheme gets precedence.",
)
NLB_IP_ADDRESS_TYPE = Source(
    f"{_LBC_SVC}#ip-address-type",
    "aws-load-balancer-ip-address-type: default ipv4; ipv4 | dualstack",
)
IP_ADDRESS_TYPE_API = Source(
    "https://docs.aws.amazon.com/sdk-for-kotlin/api/latest/elasticloadbalancingv2/"
    "aws.sdk.kotlin.services.elasticloadbalancingv2.model/-create-load-balancer-request/"
    "ip-address-type.html",
    "[Network Load Balancers and Gateway Load Balancers] The possible values are ipv4 "
    "(IPv4 addresses) and dualstack (IPv4 and IPv6 addresses).",
)
TG_FAMILY = Source(
    f"{_LBC_SRC}/pkg/service/model_build_target_group.go",
    "if ipFamily == corev1.IPv6Protocol ... unsupported IPv6 configuration, lb not dual-stack",
)
IPV6_TG_IP_ONLY = Source(
    "https://docs.aws.amazon.com/whitepapers/latest/ipv6-on-aws/"
    "scaling-the-dual-stack-network-design-in-aws.html",
    "with IPv6 targets, only the IP-type targets are supported",
)
EKS_IPV6_IP_TARGETS = Source(
    "https://docs.aws.amazon.com/eks/latest/userguide/alb-ingress.html",
    "You can only load balance over IPv6 to IP targets, not instance targets. Without this "
    "annotation, load balancing is over IPv4.",
)
PROXY_PROTOCOL = Source(
    f"{_LBC_SVC}#proxy-protocol-v2",
    "Set to '*' to enable proxy protocol v2. This annotation takes precedence over the "
    "annotation ...target-group-attributes ... The only valid value for this annotation is *.",
)
TG_ATTRIBUTES = Source(
    f"{_LBC_SVC}#target-group-attributes",
    "set the deregistration delay to 120 seconds (available range is 0-3600 seconds)",
)
PRESERVE_DEFAULT = Source(
    _NLB_TGA,
    "Instance type target groups: Enabled; IP type target groups (UDP, TCP_UDP): Enabled; "
    "IP type target groups (TCP, TLS): Disabled",
)
PRESERVE_UDP = Source(
    _NLB_TGA,
    "client IP preservation is enabled (and can't be disabled) for instance and IP type "
    "target groups with UDP and TCP_UDP protocols",
)
PRESERVE_TABLE = Source(
    _NLB_TGA,
    "When client IP preservation is enabled: IP type (IPv6), IPv6 client requests: Client "
    "IPv6 address; Instance type (IPv4), IPv6 client requests: Load balancer IPv4 address",
)
PRESERVE_OFF_TABLE = Source(
    _NLB_TGA,
    "When you disable client IP preservation, the source IP address is the private IP "
    "address of the Network Load Balancer.",
)
TRANSLATED = Source(
    f"{_LBC_SVC}#lb-source-ranges",
    "Preserve client IP has no effect on traffic converted from IPv4 to IPv6 and on traffic "
    "converted from IPv6 to IPv4. The source IP of this type of traffic is always the private "
    "IP address of the Network Load Balancer.",
)
NLB_IP_NO_CLIENT = Source(
    _LBC_NLB,
    "In case of TCP, NLB with IP targets does not pass the client source IP address unless "
    "specifically configured via target group attributes.",
)
NLB_INSTANCE_MODE = Source(
    _LBC_NLB,
    "AWS NLB sends traffic to the instances and the kube-proxy on the individual worker "
    "nodes forward it to the pods through one or more worker nodes",
)
NLB_INSTANCE_CLUSTER = Source(
    _LBC_NLB,
    "Your application pods might not see the actual client IP address even if NLB passes "
    "it along, for example instance mode with externalTrafficPolicy set to Cluster.",
)
PROXY_LOCAL_INSTANCE = Source(
    _LBC_NLB,
    "you should not configure proxy protocol v2 with NLB instance mode and "
    "externalTrafficPolicy set to Local.",
)
PROXY_AND_PRESERVE = Source(
    "",
    "no source found that calls PROXY v2 with client IP preservation a conflict: AWS lists "
    "proxy_protocol_v2.enabled and preserve_client_ip.enabled as separate attributes",
)
PROXY_V2_FAMILY = Source(
    "",
    "no source found for the address family of the PROXY v2 header on traffic the NLB "
    "translated from IPv6 to IPv4",
)
NLB_FLOW_TABLE = Source(
    "https://aws.amazon.com/blogs/networking-and-content-delivery/"
    "introducing-nlb-tcp-configurable-idle-timeout/",
    "The NLB acts as a Layer 4 proxy, keeping track of each established connection in a "
    "flow table. ... the idle timeout for TCP connections is 350 seconds, while UDP "
    "connections have a 120 second timeout.",
)
NLB_INTERNALS = Source(
    "",
    "not documented by AWS: how the flow table is shared between the NLB's nodes and zones, "
    "what a flow becomes when a node fails, and how the VPC returns a target's reply "
    "addressed to the client to the NLB",
)
DEREGISTRATION_DEFAULT = Source(
    _NLB_TGA,
    'deregistration_delay.timeout_seconds ... "Value": "300" (the attributes of a new '
    "target group, in the page's modify-target-group-attributes example)",
)
NLB_HEALTH = Source(
    f"{_LBC_SVC}#healthcheck-protocol",
    "tcp is the default health check protocol if the service spec.externalTrafficPolicy is "
    "Cluster, http if Local; if the service spec.externalTrafficPolicy is Local, do not use "
    "tcp for health check; defaults: port traffic-port, path / for HTTP(S), healthy and "
    "unhealthy threshold 3, timeout 10, interval 10, success codes 200-399",
)
NLB_HEALTH_PORT = Source(
    f"{_LBC_SVC}#healthcheck-port",
    "the default value will be spec.healthCheckNodePort when externalTrafficPolicy=local or "
    "traffic-port otherwise.",
)
DUALSTACK_UDP_OLD = Source(
    "https://repost.aws/questions/QUXzOhIBcAS9y6Qu7RPdHBcQ/ipv6-with-udp-in-aws",
    "(quoting the NLB target group docs) IPv6 target groups can only be used with dualstack "
    "load balancers with TCP or a TLS listeners.",
)
DUALSTACK_UDP_NEW = Source(
    "https://aws.amazon.com/blogs/networking-and-content-delivery/accelerate-ipv6-application-"
    "migration-with-aws-privatelink-and-dual-stack-network-load-balancers-udp-support",
    "AWS now supports UDP listeners for dual stack NLBs.",
)
# --- ALB settings ------------------------------------------------------------------------
ALB_TARGET_TYPE = Source(
    f"{_LBC_ING}#target-type",
    "alb.ingress.kubernetes.io/target-type: instance | ip, default instance",
)
ALB_INSTANCE_SERVICE = Source(
    f"{_LBC_ING}#target-type",
    'service must be of type "NodePort" or "LoadBalancer" to use instance mode',
)
ALB_SCHEME = Source(
    f"{_LBC_ING}#scheme",
    "alb.ingress.kubernetes.io/scheme: internal | internet-facing, default internal",
)
ALB_IP_ADDRESS_TYPE = Source(
    f"{_LBC_ING}#ip-address-type",
    "alb.ingress.kubernetes.io/ip-address-type: ipv4 | dualstack, default ipv4",
)
ALB_DUALSTACK_NO_PUBLIC = Source(
    "https://aws.amazon.com/blogs/networking-and-content-delivery/"
    "introducing-dual-stack-without-public-ipv4-application-load-balancer/",
    "dualstack-without-public-ipv4: Clients must connect to the load balancer using IPv6 "
    "addresses ... a new feature for internet-facing Application Load Balancers",
)
ALB_SERVICE_PRIORITY = Source(
    f"{_LBC_ING}",
    "Annotations applied to Service have higher priority over annotations applied to Ingress.",
)
ALB_CLASS = Source(
    f"{_LBC_CONF}#limiting-ingress-class",
    "If the ingress class is not specified, the controller will reconcile Ingress objects "
    "without the ingress class specified or ingress class alb.",
)
ALB_HEALTH = Source(
    f"{_LBC_ING}#health-check",
    "defaults: healthcheck-protocol HTTP, healthcheck-port traffic-port, healthcheck-path /, "
    "interval 15, timeout 5, healthy-threshold-count 2, unhealthy-threshold-count 2, "
    "success-codes 200",
)
ALB_SOURCE = Source(
    "https://docs.aws.amazon.com/global-accelerator/latest/dg/"
    "preserve-client-ip-address.headers.html",
    "Because an Application Load Balancer terminates incoming TCP connections and creates new "
    "connections to your backend targets ... The source IP address that your targets see in "
    "the TCP packet is the IP address of the Application Load Balancer.",
)
ALB_XFF = Source(
    "https://docs.aws.amazon.com/elasticloadbalancing/latest/application/x-forwarded-headers.html",
    "By default, the Application Load Balancer stores the IP address of the client in the "
    "X-Forwarded-For request header and passes the header to your server.",
)
ALB_NO_PROXY_PROTOCOL = Source(
    _NLB_TGA,
    "proxy_protocol_v2.enabled and preserve_client_ip.enabled are attributes of a Network "
    "Load Balancer's target groups (no source found that an ALB target group accepts them)",
)
ALB_STATE = Source(
    "",
    "not documented by AWS beyond the two connections it terminates and opens: how an ALB "
    "node keeps them, and what an open connection becomes when a node is replaced",
)
# --- Kubernetes ----------------------------------------------------------------------------
ETP_LOCAL = Source(
    "https://kubernetes.github.io/ingress-nginx/user-guide/retaining-client-ipaddress/",
    '(kubectl explain service.spec.externalTrafficPolicy) If set to "Local" ... each node '
    "will deliver traffic only to the node-local endpoints of the service, without "
    "masquerading the client source IP. (Traffic mistakenly sent to a node with no "
    "endpoints will be dropped.)",
)
EPS_CONDITIONS = Source(
    "https://github.com/kubernetes/api/blob/master/discovery/v1/types.go",
    "serving is identical to ready except that it is set regardless of the terminating "
    "state of endpoints ... ready should never be true for terminating endpoints",
)
PROXY_TERMINATING = Source(
    "https://github.com/kubernetes/website/commit/3cb9ee4e676135454d51bd7dc4b668fb6b131fbf",
    "If there are local endpoints and all of those are terminating, then the kube-proxy "
    "ignores any external traffic policy of Local ... This forwarding behavior for "
    "terminating endpoints exists to allow external load balancers to gracefully drain",
)
GRACE_DEFAULT = Source(
    "",
    "no source looked up for the Pod default terminationGracePeriodSeconds of 30 s "
    "(the Kubernetes API default)",
)
INGRESS_NGINX_PROXY = Source(
    "https://kubernetes.github.io/ingress-nginx/user-guide/retaining-client-ipaddress/",
    "Using proxy-protocol ... to use proxy-protocol for retaining client IPAddress "
    "(the ingress-nginx ConfigMap key use-proxy-protocol)",
)
